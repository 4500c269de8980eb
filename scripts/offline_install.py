"""Install ``byok-package`` on the air-gapped machine from an offline bundle (its ``install.py``).

``scripts/build_offline_bundle.py`` copies this file into the bundle as ``install.py``. Run it
with the Python the bundle was built for (``bundle.json``, ``python``)::

    python3 byok-package-offline-VERSION/install.py [--venv DIR]

In order, and stopping at the first problem:

1. every file named in ``SHA256SUMS`` exists and has that SHA-256, the list names
   ``bundle.json`` and ``requirements.txt``, and ``wheels/`` holds no file it does not name (a
   wheel slipped in would be installable): else refused, exit 2;
2. this Python is the bundle's target version: else refused, exit 2;
3. ``DIR`` (default ``byok-package-venv``) is created with ``python -m venv``, or reused when it
   already is a virtualenv;
4. ``pip install --no-index --find-links wheels --require-hashes -r requirements.txt`` in it,
   with pip's configuration files and ``PIP_*`` variables ignored: pip reads the bundle alone and
   checks each wheel's SHA-256 again as it installs;
5. ``DIR/bin/byok-package --version`` is run and printed.

Standard library only. Exit 0 installed, 2 refused, 1 failed, 130 interrupted; every error is
one line on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

NAME = "install"
HERE = Path(__file__).resolve().parent
SUMS = "SHA256SUMS"
#: What the install reads besides the wheels: always listed in SHA256SUMS.
REQUIRED = ("bundle.json", "requirements.txt")
EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130


class Refused(Exception):
    """The bundle or the machine is not fit to install from; ``reason`` is a stable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Failed(Exception):
    """A step failed (virtualenv, pip): the bundle may be fine, the machine needs attention."""


def say(line: str) -> None:
    """Print a progress line; a closed stdout (``install.py | head``) does not stop the install."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as Python's docs do


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sums(bundle: Path) -> dict[str, str]:
    """``SHA256SUMS`` (``sha256sum`` format) as {relative path: hex}.

    Raises:
        Refused: ``checksums_unreadable`` if the list is missing or a line is not ``HEX  PATH``
            with a plain relative path inside the bundle.
    """
    try:
        text = (bundle / SUMS).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Refused(
            "checksums_unreadable",
            f"cannot read {bundle / SUMS}: {exc}; is this an unpacked bundle?",
        ) from None
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        digest, sep, name = line.partition("  ")
        name = name.removeprefix("*")
        parts = PurePosixPath(name).parts
        if (
            not sep
            or len(digest) != 64
            or digest.strip("0123456789abcdef")
            or not parts
            or name.startswith("/")
            or ".." in parts
            or "\\" in name
        ):
            raise Refused("checksums_unreadable", f"{SUMS} line {number} is not 'SHA256  PATH'")
        sums[name] = digest
    if not sums:
        raise Refused("checksums_unreadable", f"{SUMS} lists no file")
    return sums


def verify_bundle(bundle: Path) -> int:
    """Check every listed file against ``SHA256SUMS``, and that ``wheels/`` holds only listed
    files; return how many files were checked.

    Raises:
        Refused: ``checksum_mismatch`` (a file differs or is missing) or ``unlisted_file``.
    """
    sums = read_sums(bundle)
    for name, expected in sorted(sums.items()):
        path = bundle / name
        try:
            actual = _sha256(path)
        except OSError:
            raise Refused(
                "checksum_mismatch",
                f"{name} is missing from the bundle: it was altered or damaged; do not install "
                "from it, get a fresh copy",
            ) from None
        if actual != expected:
            raise Refused(
                "checksum_mismatch",
                f"{name} does not match {SUMS} (SHA-256 {actual}, expected {expected}): the "
                "bundle was altered or damaged; do not install from it, get a fresh copy",
            )
    wheels = bundle / "wheels"
    present = sorted(f"wheels/{p.name}" for p in wheels.iterdir()) if wheels.is_dir() else []
    extra = [name for name in [*REQUIRED, *present] if name not in sums]
    if extra:
        raise Refused(
            "unlisted_file",
            f"{extra[0]} is not listed in {SUMS}: the bundle was altered; do not install from "
            "it, get a fresh copy",
        )
    return len(sums)


def read_target(bundle: Path) -> dict[str, Any]:
    """``bundle.json`` (already checked against ``SHA256SUMS``)."""
    try:
        target: dict[str, Any] = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Refused("bundle_unreadable", f"cannot read bundle.json: {exc}") from None
    return target


def check_python(target: dict[str, Any]) -> None:
    """Refuse a Python other than the bundle's target version (its wheels would not install)."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    wanted = str(target.get("python", ""))
    if here != wanted:
        raise Refused(
            "wrong_python",
            f"this bundle is for Python {wanted} ({', '.join(target.get('platforms', []))}), "
            f"this is Python {here} ({sys.executable}): run install.py with Python {wanted}, "
            "or build a bundle for this machine (--python-version, --platform)",
        )


def _venv_bin(venv: Path, program: str) -> Path:
    if os.name == "nt":
        return venv / "Scripts" / f"{program}.exe"
    return venv / "bin" / program


def make_venv(venv: Path) -> bool:
    """Create the virtualenv (``python -m venv``); reuse one that exists. True if created.

    Raises:
        Refused: ``venv_not_empty`` if the folder exists and is not a virtualenv.
        Failed: ``python -m venv`` failed (on Debian: ``apt install python3-venv``).
    """
    if venv.exists():
        if (venv / "pyvenv.cfg").is_file():
            return False
        if not venv.is_dir() or any(venv.iterdir()):
            raise Refused(
                "venv_not_empty",
                f"{venv} exists and is not a virtualenv: choose another --venv folder",
            )
    done = subprocess.run(
        [sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise Failed(
            f"python -m venv {venv} failed: {lines[-1]} "
            "(on Debian/Ubuntu the venv module is the package python3-venv)"
        )
    return True


def _offline_env() -> dict[str, str]:
    """The environment pip runs in: no ``PIP_*`` variable, and no pip configuration file."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env.pop("PYTHONPATH", None)
    return env


def pip_install(venv: Path, bundle: Path) -> None:
    """Install the bundle's pinned wheels into ``venv`` with pip, from the bundle alone.

    Raises:
        Failed: pip refused or failed; its first ``ERROR`` line is in the message.
    """
    python = _venv_bin(venv, "python")
    argv = [
        str(python), "-m", "pip", "--isolated", "--disable-pip-version-check",
        "--no-input", "install", "--no-index", "--find-links", str(bundle / "wheels"),
        "--only-binary=:all:", "--require-hashes", "--no-cache-dir",
        "-r", str(bundle / "requirements.txt"),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=_offline_env(), check=False)
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        errors = (
            [
                line
                for line in lines
                if line.startswith("ERROR") and not line.startswith("ERROR: Ignored")
            ]
            or lines[-1:]
            or ["no output"]
        )
        raise Failed(
            f"pip could not install the bundle's wheels into {venv}: {errors[0]} "
            "(was the bundle built for this machine's platform? see bundle.json)"
        )


def installed_version(venv: Path) -> str:
    """``byok-package --version`` as run from the virtualenv."""
    program = _venv_bin(venv, "byok-package")
    done = subprocess.run(
        [str(program), "--version"], capture_output=True, text=True, env=_offline_env(), check=False
    )
    if done.returncode != 0:
        raise Failed(f"{program} --version failed (exit {done.returncode}) after installing")
    return done.stdout.strip()


def install(bundle: Path, venv: Path) -> int:
    """Verify, create the virtualenv, install, show the version. Returns the exit code."""
    checked = verify_bundle(bundle)
    say(f"{NAME}: {checked} files match {SUMS}")
    target = read_target(bundle)
    check_python(target)
    created = make_venv(venv)
    say(f"{NAME}: {'created' if created else 'using'} the virtualenv {venv}")
    pip_install(venv, bundle)
    say(installed_version(venv))
    hsm = (
        "HSM mode available: python-pkcs11 is installed"
        if target.get("pkcs11")
        else "no HSM mode: python-pkcs11 is not in this bundle"
    )
    say(f"{NAME}: done: run {_venv_bin(venv, 'byok-package')}; {hsm}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Command line: ``install.py [--venv DIR]``."""
    parser = argparse.ArgumentParser(
        prog="install.py",
        description="Install byok-package from this offline bundle into a new virtualenv, "
        "after checking SHA256SUMS; no network is used. Exit 0 installed, 2 refused, 1 failed.",
    )
    parser.add_argument(
        "--venv",
        default="byok-package-venv",
        metavar="DIR",
        help="the virtualenv to create (default: byok-package-venv in the current folder)",
    )
    args = parser.parse_args(argv)
    try:
        return install(HERE, Path(args.venv).absolute())
    except Refused as exc:
        print(f"{NAME}: refused [{exc.reason}]: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except Failed as exc:
        print(f"{NAME}: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(
            f"{NAME}: failed: {exc.filename or ''} {exc.strerror or exc}".strip(), file=sys.stderr
        )
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{NAME}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
