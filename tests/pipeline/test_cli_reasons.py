"""The `byok` command's own reason codes (CLI_REASONS): listed in the README, distinct from the
pipeline's, every code the CLI raises is one of the two lists, and each is asserted by a test."""

from __future__ import annotations

import re

from testsupport import REPO

from byok_pipeline.core.reasons import CLI_REASONS, REASONS

_RAISED = re.compile(
    r"""(?:Rejected\(\s*|reason\s*=\s*|_REACHABLE\s*=\s*|_REQUIRED\s*=\s*)"([a-z_]+)\"""",
)
#: Where the codes a `byok` command can end with are raised (beyond the pipeline's own).
SOURCES = [
    *sorted((REPO / "byok_pipeline" / "cli").glob("*.py")),
    REPO / "byok_pipeline" / "adapters" / "endpoints.py",
    REPO / "byok_pipeline" / "adapters" / "transient.py",
]


def test_cli_reasons_are_in_the_readme_and_apart_from_the_pipelines() -> None:
    readme = (REPO / "README.md").read_text()
    assert [code for code in CLI_REASONS if f"`{code}`" not in readme] == []
    assert set(CLI_REASONS) & set(REASONS) == set()


def test_every_code_the_cli_raises_is_documented() -> None:
    """In one of the two lists, or among the README's failures a retry may fix."""
    raised = {code for path in SOURCES for code in _RAISED.findall(path.read_text())}
    assert raised, "the pattern finds nothing: update it"
    readme = (REPO / "README.md").read_text()
    others = {
        code for code in raised - set(REASONS) - set(CLI_REASONS) if f"`{code}`" not in readme
    }
    assert others == set()


def test_every_cli_reason_is_asserted_by_a_test() -> None:
    tests = "\n".join(
        p.read_text()
        for p in sorted((REPO / "tests" / "pipeline").glob("test_*.py"))
        if p.name != "test_cli_reasons.py"
    )
    untested = [c for c in CLI_REASONS if f'"{c}"' not in tests and f"[{c}]" not in tests]
    assert untested == []
