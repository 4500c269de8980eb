"""`byok drop DIR` (issue 14, part 6): a drop folder for automation. Each complete package goes
through the upload gate once, then moves to `uploaded/` or `refused/` with a reason file; a file
still being written is never taken; a restart after the upload uploads nothing twice; storage
down for a while loses nothing; plaintext key material is refused and never shown."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pipeline_support import Stack
from test_cli import audit_keys, cli_env, run_json  # noqa: F401  # fixtures, used by name
from test_upload_gate import PLAINTEXT, readme_block

from byok_pipeline.cli.drop import DropFolder, Outcome
from byok_pipeline.cli.main import main
from byok_pipeline.cli.upload import manifest_json

BYOK = str(Path(sys.executable).with_name("byok"))


@pytest.fixture
def drop(cli_env: Stack, tmp_path: Path) -> tuple[Stack, Path]:  # noqa: F811  # imported above
    """The local stack with a person's environment, and an empty drop folder."""
    folder = tmp_path / "drop"
    folder.mkdir()
    return cli_env, folder


def _put(folder: Path, stack: Stack, name: str, *, marker: bool = False) -> bytes:
    """A package and its manifest, as the vendor's tool puts them; the package's bytes."""
    pkg = stack.package("oct-256", name)
    (folder / f"{name}.manifest.json").write_bytes(manifest_json(pkg.manifest))
    (folder / f"{name}.byok").write_bytes(pkg.data)
    if marker:
        (folder / f"{name}.byok.done").touch()
    return pkg.data


def _drop(capsys: pytest.CaptureFixture[str], folder: Path, *, expect: int = 0) -> list[Any]:
    """Run `byok drop FOLDER --once --json`: its log lines (the error object, if any, last)."""
    rc = main(["drop", str(folder), "--once", "--interval", "0.1", "--json"])
    out = capsys.readouterr()
    assert rc == expect, out.err
    assert "Traceback" not in out.err
    assert len(out.err.splitlines()) == (0 if expect == 0 else 1), out.err
    return [json.loads(line) for line in out.out.splitlines()]


def _incoming(stack: Stack) -> list[str]:
    return stack.blobs(stack.settings.incoming_container)


def _reason(path: Path) -> str:
    text = path.read_text()
    assert text.endswith("\n")
    assert text.count("\n") == 1, text
    return text.strip()


# -- without a stack: when a file is complete -----------------------------------------------------
def test_a_file_is_taken_only_when_complete(tmp_path: Path) -> None:
    """Growing: never; the same size and time at two polls: yes; a marker: at once; with
    --done-marker only the marker counts."""
    taken: list[bytes] = []

    def upload(path: Path, manifest: Path | None) -> dict[str, Any]:
        assert manifest is None
        taken.append(path.read_bytes())
        return {"container": "incoming", "blob_name": path.name, "package_sha256": "0" * 64}

    logged: list[Outcome] = []
    watcher = DropFolder(tmp_path, upload=upload, log=logged.append)
    growing = tmp_path / "growing.byok"
    for chunk in (b"a" * 10, b"b" * 10, b"c" * 10):
        with growing.open("ab") as f:
            f.write(chunk)
        assert watcher.poll() == ([], 1)  # changed since the last poll: still being written
    (outcomes, pending) = watcher.poll()  # unchanged: complete
    assert (len(outcomes), pending) == (1, 0)
    assert taken == [b"a" * 10 + b"b" * 10 + b"c" * 10]
    assert (tmp_path / "uploaded" / "growing.byok").is_file()
    assert _reason(tmp_path / "uploaded" / "growing.byok.reason").startswith("uploaded: ")
    assert [o.outcome for o in logged] == ["uploaded"]

    (tmp_path / "marked.byok").write_bytes(b"x")
    (tmp_path / "marked.byok.done").touch()
    assert [o.file for o in watcher.poll()[0]] == ["marked.byok"]  # the marker: at the first look
    assert (tmp_path / "uploaded" / "marked.byok.done").is_file()  # the marker moves with it

    strict = DropFolder(tmp_path, upload=upload, log=logged.append, done_marker=True)
    (tmp_path / "late.byok").write_bytes(b"y")
    for _ in range(3):
        assert strict.poll() == ([], 1)
    (tmp_path / "late.byok.done").touch()
    assert [o.file for o in strict.poll()[0]] == ["late.byok"]
    # the same name again later: settled beside the first, never over it
    (tmp_path / "late.byok").write_bytes(b"z")
    (tmp_path / "late.byok.done").touch()
    strict.poll()
    again = list((tmp_path / "uploaded").glob("*/late.byok"))
    assert [p.read_bytes() for p in again] == [b"z"]
    assert (tmp_path / "uploaded" / "late.byok").read_bytes() == b"y"


# -- against the local stack ----------------------------------------------------------------------
@pytest.mark.azurite
def test_plaintext_keys_are_refused_and_packages_uploaded(
    drop: tuple[Stack, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    stack, folder = drop
    data = _put(folder, stack, "drop-good")
    secret = PLAINTEXT["PEM PKCS#8"]()
    (folder / "oops.byok").write_bytes(secret)
    log = _drop(capsys, folder)
    by_file = {line["file"]: line for line in log}
    assert len(log) == 2
    assert by_file["oops.byok"]["outcome"] == "refused"
    assert by_file["oops.byok"]["reason"] == "plaintext_key"
    assert by_file["drop-good.byok"]["outcome"] == "uploaded"
    assert set(by_file["oops.byok"]) == {"time", "file", "outcome", "reason", "message"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", by_file["oops.byok"]["time"])
    refused = folder / "refused"
    assert (refused / "oops.byok").read_bytes() == secret
    reason = _reason(refused / "oops.byok.reason")
    assert reason.startswith("plaintext_key: STOP: ")
    # not a byte of the key in the log or the reason file
    for chunk in secret.splitlines():
        if b"-----" not in chunk:
            assert chunk.decode() not in reason
            assert chunk.decode() not in json.dumps(log)
    uploaded = folder / "uploaded"
    assert sorted(p.name for p in uploaded.iterdir()) == [
        "drop-good.byok", "drop-good.byok.reason", "drop-good.manifest.json",
    ]  # fmt: skip
    assert _reason(uploaded / "drop-good.byok.reason").startswith("uploaded: uploaded to ")
    assert sorted(p.name for p in folder.iterdir()) == ["refused", "uploaded"]
    assert _incoming(stack) == ["drop-good.byok"]
    blob = stack.service.get_blob_client(stack.settings.incoming_container, "drop-good.byok")
    assert blob.download_blob().readall() == data
    assert _drop(capsys, folder) == []  # nothing left: nothing to do


@pytest.mark.azurite
def test_a_restart_after_the_upload_uploads_nothing_twice(
    drop: tuple[Stack, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack, folder = drop
    data = _put(folder, stack, "drop-restart", marker=True)

    def crash(*_: Any) -> Outcome:
        raise KeyboardInterrupt  # stopped after the upload, before the move

    with monkeypatch.context() as patch:
        patch.setattr(DropFolder, "_settle", crash)
        assert main(["drop", str(folder), "--once", "--json"]) == 130
    capsys.readouterr()
    assert (folder / "drop-restart.byok").is_file()
    client = stack.service.get_blob_client(stack.settings.incoming_container, "drop-restart.byok")
    etag = client.get_blob_properties().etag
    # the second run finds the same bytes waiting: done, not uploaded again
    (line,) = _drop(capsys, folder)
    assert (line["outcome"], line["reason"]) == ("uploaded", "uploaded")
    assert "already waiting" in line["message"]
    assert client.get_blob_properties().etag == etag
    assert _incoming(stack) == ["drop-restart.byok"]
    assert (folder / "uploaded" / "drop-restart.byok.done").is_file()
    # imported meanwhile, then the same file again (a restart after the pipeline took it)
    assert main(["watch", "--once"]) == 0
    capsys.readouterr()
    (folder / "drop-restart.byok").write_bytes(data)
    (line,) = _drop(capsys, folder)
    assert (line["outcome"], line["reason"]) == ("uploaded", "already_imported")
    assert _incoming(stack) == []
    (again,) = (folder / "uploaded").glob("*/drop-restart.byok")
    assert _reason(again.with_name("drop-restart.byok.reason")).startswith("already_imported: ")
    versions = stack.hsm.key_client().list_properties_of_key_versions("drop-restart")
    assert len(list(versions)) == 1


@pytest.mark.azurite
def test_storage_down_for_a_while_loses_nothing(
    drop: tuple[Stack, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from testsupport import closed_port

    stack, folder = drop
    _put(folder, stack, "drop-outage", marker=True)
    live = os.environ["BYOK_STORAGE"]
    dead = re.sub(
        r"BlobEndpoint=http://[^/]+/", f"BlobEndpoint=http://127.0.0.1:{closed_port()}/", live
    )
    assert dead != live
    monkeypatch.setenv("BYOK_STORAGE", dead)
    for _ in range(2):
        *log, failure = _drop(capsys, folder, expect=1)
        assert [(x["outcome"], x["reason"]) for x in log] == [("retry", "storage_unreachable")]
        assert failure["reason"] == "storage_unreachable"
        assert "left in" in failure["message"]
        assert sorted(p.name for p in folder.iterdir()) == [
            "drop-outage.byok", "drop-outage.byok.done", "drop-outage.manifest.json",
        ]  # fmt: skip
    monkeypatch.setenv("BYOK_STORAGE", live)
    (line,) = _drop(capsys, folder)
    assert line["outcome"] == "uploaded"
    assert _incoming(stack) == ["drop-outage.byok"]


@pytest.mark.azurite
def test_the_readme_block_runs_and_takes_files_as_they_appear(
    drop: tuple[Stack, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The README's two commands: `--once`, then the long-running one with `--done-marker`
    while packages appear, one of them written in halves; Ctrl-C ends it with 130."""
    stack, folder = drop
    monkeypatch.chdir(folder.parent)
    once, running = readme_block("# drop-folder")
    assert once[:2] == running[:2] == ["byok", "drop"]
    _put(folder, stack, "drop-first")
    assert main(once[1:]) == 0, capsys.readouterr().err
    assert "drop-first.byok uploaded [uploaded]: " in capsys.readouterr().out

    proc = subprocess.Popen([BYOK, *running[1:]], env=dict(os.environ), cwd=folder.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith("watching drop ")
        _put(folder, stack, "drop-second")  # complete, but no marker yet: not taken
        pkg = stack.package("ec-p256", "drop-halves")
        half = len(pkg.data) // 2
        (folder / "drop-halves.byok").write_bytes(pkg.data[:half])
        time.sleep(2.0)  # four polls
        assert _incoming(stack) == ["drop-first.byok"]
        (folder / "drop-second.byok.done").touch()
        with (folder / "drop-halves.byok").open("ab") as f:
            f.write(pkg.data[half:])
        (folder / "drop-halves.byok.done").touch()
        _wait_for(lambda: len(list((folder / "uploaded").glob("*.byok"))) == 3)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.startswith("byok: interrupted (Ctrl-C)")
    lines = out.splitlines()
    assert len(lines) == 2, out  # one line per file
    assert all(" uploaded [uploaded]: " in line for line in lines)
    assert _incoming(stack) == ["drop-first.byok", "drop-halves.byok", "drop-second.byok"]
    blob = stack.service.get_blob_client(stack.settings.incoming_container, "drop-halves.byok")
    taken = blob.download_blob().readall()
    assert hashlib.sha256(taken).hexdigest() == hashlib.sha256(pkg.data).hexdigest()


def _wait_for(done: Callable[[], bool], seconds: float = 30.0) -> None:
    end = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)
