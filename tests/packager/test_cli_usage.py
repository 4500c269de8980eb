"""``byok-package`` usage errors end like every other error: one line on stderr (a JSON object on
stdout too with ``--json``), exit 2, a suggestion for a near miss, never argparse's usage dump."""

from __future__ import annotations

import json

import pytest

from offline_packager.cli import main


def test_a_mistyped_command_is_one_line_with_a_suggestion(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["wrpa"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("byok-package: usage error: ")
    assert "did you mean 'wrap'?" in lines[0]


def test_a_usage_error_with_json_is_one_json_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", "--no-such-option", "x.byok"]) == 2
    captured = capsys.readouterr()
    error = json.loads(captured.out)
    assert (error["status"], error["reason"]) == ("usage", "usage")
    assert "--no-such-option" in error["message"]
    assert len(captured.err.splitlines()) == 1
    assert "Traceback" not in captured.err


def test_a_missing_required_option_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["wrap", "--kek", "k.pem"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "required" in err
