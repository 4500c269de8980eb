"""Build ``dist/function-app.zip``: exactly what the Azure Function runs, nothing else.

The file list is the repository's files (tracked, or untracked and not git-ignored) that
``.funcignore`` admits, so ``func azure functionapp publish`` and this zip ship the same code.
Entries are sorted and carry a fixed timestamp, so the same tree gives the same bytes.

Usage: ``python scripts/build_function_zip.py [--out dist/function-app.zip] [--list]``
(``make package``). Exit 1 with one line on any error.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pathspec

REPO = Path(__file__).resolve().parent.parent
#: What the Function needs; the build fails if .funcignore lets any of these out.
REQUIRED = ("function_app.py", "host.json", "requirements.txt", "byok_pipeline/__init__.py")
FIXED_TIME = (2020, 1, 1, 0, 0, 0)


def candidate_files(root: Path) -> list[str]:
    """The files of the working tree that git would commit (tracked, or new and not ignored)."""
    try:
        out = subprocess.run(
            [
                "git",
                "-C",
                str(root),
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return sorted(
            str(p.relative_to(root)).replace(os.sep, "/")
            for p in root.rglob("*")
            if p.is_file() and ".git" not in p.parts
        )
    return sorted({name for name in out.decode().split("\0") if name and (root / name).is_file()})


def package_files(root: Path = REPO) -> list[str]:
    """The repository paths the deployment package holds, sorted.

    Raises:
        SystemExit: .funcignore is missing, or it leaves out a file the Function needs.
    """
    ignore_file = root / ".funcignore"
    if not ignore_file.is_file():
        raise SystemExit(f"build: {ignore_file} is missing")
    spec = pathspec.GitIgnoreSpec.from_lines(ignore_file.read_text().splitlines())
    files = [name for name in candidate_files(root) if not spec.match_file(name)]
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        raise SystemExit(f"build: .funcignore leaves out {', '.join(missing)}")
    return files


def build(out: Path, root: Path = REPO) -> list[str]:
    """Write the zip atomically (a temp file renamed into place); return its entries."""
    files = package_files(root)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".function-app-", suffix=".zip")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name in files:
                info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, (root / name).read_bytes())
        Path(tmp).replace(out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "dist" / "function-app.zip"))
    parser.add_argument("--list", action="store_true", help="print the entries")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        files = build(out)
    except OSError as exc:
        print(f"build: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if args.list:
        print("\n".join(files))
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"{out}: {len(files)} files, {out.stat().st_size} bytes, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
