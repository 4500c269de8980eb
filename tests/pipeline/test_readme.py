"""The README a newcomer follows: its first ceremony runs as printed against a local stack
`byok dev up` starts, its troubleshooting tables are the code's reason texts, every fenced block
is run by a test (or says why not), and every local link and anchor in README.md and docs/
resolves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from testsupport import REPO

from byok_pipeline.core.reasons import CLI_REASONS, REASONS

README = REPO / "README.md"
CEREMONY = "# local-ceremony"
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)

#: Blocks no test runs, by their first line, and why.
NOT_RUN = {
    "make deps    # .venv with the pinned Python packages (byok, byok-package), npm install for "
    "Azurite": "make deps/demo/test: what runs these tests",
    "byok-package wrap --kek KEK.pem --kek-kid KID --kek-sha256 SHA256 \\": (
        "the ceremony's wrap with placeholders; local-ceremony runs the same commands"
    ),
    "{": "a JSON example of the import policy, not a command",
    "byok-package wrap --kek KEK.pem --kek-kid KID (--generate TYPE | --key FILE) --out "
    "NAME.byok": "a synopsis, not a command",
    "received → validated → importing → imported | rejected | failed | verification_failed": (
        "the status states, not a command"
    ),
    "function_app.py       Azure Functions triggers (wiring only: parse the trigger, call the "
    "runtime)": "the layout, not a command",
}


def _blocks(text: str) -> list[str]:
    return [m.group(1) for m in FENCE.finditer(text)]


def _block(label: str) -> str:
    (found,) = [b for b in _blocks(README.read_text()) if b.startswith(label + "\n")]
    return found


def test_every_readme_block_is_run_by_a_test_or_says_why_not() -> None:
    tests = "\n".join(p.read_text() for p in sorted((REPO / "tests").rglob("test_*.py")))
    for block in _blocks(README.read_text()):
        first = block.strip().splitlines()[0].strip()
        if first in NOT_RUN:
            continue
        assert re.fullmatch(r"# [a-z][a-z0-9-]+", first), f"a block without a label: {first!r}"
        assert f'"{first}"' in tests, f"no test names the block {first!r}"


def _ceremony_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BYOK_", "AZURE_"))}
    env["HOME"] = str(tmp_path)
    env.pop("NO_COLOR", None)
    return env


@pytest.mark.azurite
def test_the_local_ceremony_runs_as_printed(tmp_path: Path) -> None:
    """The block with bash -e in a fresh folder holding this clone's `.venv` (the README runs it
    from the clone's root), `make deps` left out: it is what runs these tests. The kid and the
    KEK's SHA-256 are captured from `--json` exactly as printed."""
    lines = _block(CEREMONY).splitlines()
    assert lines[1] == "make deps"
    script = "\n".join(lines[2:]) + "\n"
    assert "dev down --dir .byok-dev" in script.splitlines()[-1]
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    env = _ceremony_env(tmp_path)
    try:
        run = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, timeout=300,
                             capture_output=True, text=True, check=False)  # fmt: skip
    finally:
        subprocess.run([str(tmp_path / ".venv" / "bin" / "byok"), "dev", "down", "--dir", str(tmp_path / ".byok-dev")],
                       cwd=tmp_path, env=env, timeout=60, capture_output=True, check=False)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    form_line = r"^ceremony form: kid (\S+), KEK SPKI SHA-256 ([0-9a-f]{64})$"
    form = re.search(form_line, out, re.MULTILINE)
    assert form, out
    kid, sha256 = form.groups()
    assert re.fullmatch(r"https://127\.0\.0\.1:\d+/keys/byok-kek-local/[0-9a-f]{32}", kid), kid
    assert f"KEK {kid} (SPKI SHA-256 {sha256})" in out
    assert "result:       VALID" in out
    assert "payments-2026.byok: imported" in out
    assert "\nimported match\n" in out
    assert "audit trail intact" in out
    assert "Traceback" not in run.stderr


def _rows(text: str) -> dict[str, str]:
    return {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| `([a-z0-9_]+)` \| (.*) \|$", text, re.MULTILINE)
    }


def test_troubleshooting_tables_are_the_codes_texts() -> None:
    """README "Troubleshooting" is REASONS, word for word and in order; the `byok` command's own
    codes (exit codes and errors) are CLI_REASONS. Fix the README from the expected rows."""
    text = README.read_text()
    section = text.split("\n## Troubleshooting\n", 1)[1].split("\n## ", 1)[0]
    expected = "".join(f"| `{code}` | {what} |\n" for code, what in REASONS.items())
    assert expected in section
    rows = _rows(text)
    wrong = {code: what for code, what in CLI_REASONS.items() if rows.get(code) != what}
    assert wrong == {}, "".join(f"| `{code}` | {what} |\n" for code, what in wrong.items())


def _slug(heading: str) -> str:
    heading = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return heading.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_local_links_and_anchors_resolve(doc: Path) -> None:
    text = FENCE.sub("", doc.read_text())
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        missing = not path.exists()
        if missing or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
            broken.append(target)
    assert broken == []


def test_moved_reference_is_in_docs() -> None:
    """What left the README is in docs/, and the README links to it."""
    reference = (REPO / "docs" / "reference.md").read_text()
    for heading in ("Settings", "Status documents", "Throughput at Managed HSM's limits",
                    "Reliability"):  # fmt: skip
        assert f"\n## {heading}\n" in reference, heading
    assert (REPO / "docs" / "exactly-once.md").read_text().startswith("# How exactly-once works")
    readme = README.read_text()
    assert "(docs/reference.md)" in readme
    assert "(docs/exactly-once.md)" in readme
    # prerequisites before anything else, the air-gapped install linked from them
    prerequisites = readme.split("\n## Prerequisites\n", 1)[1].split("\n## ", 1)[0]
    assert readme.index("\n## ") == readme.index("\n## Prerequisites\n")
    assert "Python ≥ 3.11" in prerequisites
    assert "Node.js ≥ 18" in prerequisites
    assert "(#install-byok-package-on-the-air-gapped-machine)" in prerequisites
