"""Errors say what to do (issue 14, part 2): every `byok` command, run against a dead stack
(closed ports on 127.0.0.1), fails within seconds with one line on stderr that names the
endpoint and the fix, never a traceback; usage errors are one line too (JSON with --json), with
a suggestion for a typo; a missing login is a login error; Ctrl-C ends with 130 and a reader
that went away (`| head -1`) with 141, both silently."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pipeline_support import Stack
from test_cli import audit_keys, cli_env, run_json  # noqa: F401  # fixtures, used by name
from testsupport import closed_port, write_ec_key

from byok_pipeline.cli.main import build_parser, main
from offline_packager.cli import main as package_main

BYOK = str(Path(sys.executable).with_name("byok"))
#: Every command, what it reaches first on a dead stack ("network": it must name the HSM's or
#: storage's endpoint; "offline": it needs neither and succeeds), and the arguments it needs
#: beyond its required ones. A new command fails test_every_command_is_covered until added.
COMMANDS: dict[str, tuple[str, list[str]]] = {
    "kek create": ("network", []),
    "kek download": ("network", ["--name", "dead-kek"]),
    "kek attest": ("network", ["--name", "dead-kek"]),
    "upload": ("network", []),
    "drop": ("network", ["--once"]),
    "import": ("network", []),
    "status": ("network", []),
    "watch": ("network", ["--once"]),
    "dev down": ("offline", []),
    "reconcile": ("network", []),
    "reasons": ("offline", []),
    "audit init": ("network", []),
    "audit verify": ("network", []),
    "audit export": ("network", []),
    "policy validate": ("offline", []),
    "policy show": ("network", []),
    "policy set": ("network", []),
    "approve upload": ("network", []),
}
NOT_RUN = {
    "dev up": "starts Azurite and the emulator (test_cli.py runs it)",
    "serve": "a long-running server with tests of its own",
}
SECONDS = 6.0  # "within seconds": one retry of a refused connection, plus Python's start


def leaf_commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every runnable command of the parser, by its words ("kek create")."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from leaf_commands(sub, (*prefix, name))
            return
    yield " ".join(prefix), parser


def required_args(parser: argparse.ArgumentParser, samples: dict[str, str]) -> list[str]:
    """Values for the command's required positionals and options (one of each required
    group), from ``samples`` by destination."""
    argv: list[str] = []
    grouped = {a.dest: g for g in parser._mutually_exclusive_groups for a in g._group_actions}
    chosen: set[int] = set()
    for action in parser._actions:
        group = grouped.get(action.dest)
        if group is not None and group.required:
            if id(group) in chosen:
                continue
            chosen.add(id(group))
        elif (action.option_strings and not action.required) or (
            not action.option_strings and action.nargs in ("?", "*")
        ):
            continue
        if action.dest == "help":
            continue
        assert action.dest in samples, f"add a sample value for {action.dest!r}"
        value = samples[action.dest]
        argv += [action.option_strings[0], value] if action.option_strings else [value]
    return argv


@pytest.fixture(scope="module")
def dead(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The settings of a local stack that is not running, and valid input files for it."""
    tmp = tmp_path_factory.mktemp("dead")
    hsm = f"https://127.0.0.1:{closed_port()}"
    blob = f"http://127.0.0.1:{closed_port()}/devstoreaccount1"
    kek = rsa.generate_private_key(65537, 2048)
    (tmp / "kek.pem").write_bytes(
        kek.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    signer = write_ec_key(tmp / "person.pem")
    package = tmp / "dead-key.byok"
    kid = f"{hsm}/keys/dead-kek/{'a' * 32}"
    assert package_main(["wrap", "--kek", str(tmp / "kek.pem"), "--kek-kid", kid,
                         "--generate", "oct-256", "--out", str(package)]) == 0  # fmt: skip
    approval = tmp / "dead-key.approval-alice.json"
    assert package_main(["approve", str(tmp / "dead-key.manifest.json"), "--approver-id", "alice",
                         "--signer-key", str(signer), "--out", str(approval)]) == 0  # fmt: skip
    drop = tmp / "drop"  # a package with its marker: taken at the first look
    drop.mkdir()
    (drop / package.name).write_bytes(package.read_bytes())
    (drop / f"{package.name}.done").touch()
    policy = tmp / "policy.json"
    policy.write_text(json.dumps({"policy_version": 1, "rules": [{"prefix": "dead-"}]}))
    (tmp / "emulator").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BYOK_", "AZURE_"))}
    env |= {
        "BYOK_HSM_URL": hsm,
        "BYOK_STORAGE": "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
        f"KBHBeksoGMGw==;BlobEndpoint={blob};",
        "BYOK_HSM_EMULATOR_DIR": str(tmp / "emulator"),
        "BYOK_AUDIT_PERSON_KEY": str(signer),
        "BYOK_AUDIT_SIGNING_KID": f"{hsm}/keys/dead-signer/{'b' * 32}",
    }
    samples = {
        "package": str(package),
        "name": "dead-kek",
        "out": str(tmp / "out.pem"),
        "attestation": str(tmp / "out.attestation.json"),
        "file": str(policy),
        "approval": str(approval),
        "key": "dead-key",
        "dir": str(tmp / "no-stack"),
        "folder": str(drop),
    }
    return {"env": env, "samples": samples, "endpoints": (hsm, blob.rsplit("/", 1)[0])}


def _run(argv: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    proc = subprocess.run([BYOK, *argv], env=env, capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    return proc, time.monotonic() - start


def test_every_command_is_covered() -> None:
    found = {name for name, _ in leaf_commands(build_parser())}
    assert found - set(COMMANDS) - set(NOT_RUN) == set(), "add the new command to COMMANDS"
    assert set(COMMANDS) <= found


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_against_a_dead_stack(command: str, dead: dict[str, Any]) -> None:
    reaches, extra = COMMANDS[command]
    parsers = dict(leaf_commands(build_parser()))
    argv = [*command.split(), *required_args(parsers[command], dead["samples"]), *extra, "--json"]
    proc, seconds = _run(argv, dead["env"])
    assert "Traceback" not in proc.stderr
    assert seconds < SECONDS, f"{command} took {seconds:.1f} s"
    if reaches == "offline":
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == 1, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    hsm, storage = dead["endpoints"]
    line = proc.stderr.strip()
    assert line.startswith("byok: failed [")
    assert (
        f"the HSM at {hsm} is unreachable" in line or f"storage at {storage} is unreachable" in line
    )
    assert "`byok dev up`" in line
    failure = json.loads(proc.stdout.splitlines()[-1])  # after `byok drop`'s log line
    assert failure["status"] == "failed"
    assert failure["reason"] in ("hsm_unreachable", "storage_unreachable")


@pytest.mark.parametrize("command", [*COMMANDS, "dev up"])
def test_every_command_has_one_line_usage_errors(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*command.split(), "--bogus-option", "--json"]) == 2
    out = capsys.readouterr()
    assert len(out.err.splitlines()) == 1, out.err
    assert ": usage error: " in out.err  # a missing argument, or the unknown option
    assert json.loads(out.out)["status"] == "usage"


def test_usage_errors_are_one_line_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["uplaod", "x.byok"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("byok: usage error: ")
    assert "did you mean 'upload'?" in err
    assert len(err.splitlines()) == 1
    assert main(["upload", "x.byok", "--force-ofline", "--json"]) == 2
    out = capsys.readouterr()
    assert json.loads(out.out)["reason"] == "usage"
    assert "did you mean '--force-offline'?" in json.loads(out.out)["message"]
    assert main(["kek", "create", "--json"]) == 2  # --name is required
    out = capsys.readouterr()
    assert out.err.startswith("byok kek create: usage error: ")
    assert "--name" in json.loads(out.out)["message"]
    assert main(["status", "--state"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


# -- login, Ctrl-C, a reader that went away --------------------------------------------------------
@pytest.mark.azurite
def test_a_missing_login_is_one_line_and_verbose_says_why(
    cli_env: Stack,  # noqa: F811  # the fixture imported above
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the emulator's credential the Azure default chain runs and finds nothing."""
    monkeypatch.delenv("BYOK_HSM_EMULATOR_DIR")
    for name in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "IDENTITY_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no `az`, `azd`, `pwsh`
    assert main(["kek", "create", "--name", "login-kek", "--json"]) == 1
    out = capsys.readouterr()
    assert len(out.err.splitlines()) == 1, out.err
    assert "[login_required]" in out.err
    assert "`az login`" in out.err
    assert json.loads(out.out)["reason"] == "login_required"
    assert "EnvironmentCredential" not in out.err  # the chain's own reasons: only --verbose
    assert main(["kek", "create", "--name", "login-kek", "--verbose"]) == 1
    verbose = capsys.readouterr().err
    assert "EnvironmentCredential" in verbose
    assert "Traceback" not in verbose


def test_ctrl_c_is_130_and_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import byok_pipeline.cli.main as cli

    def interrupted(_: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setitem(cli._COMMANDS, "reasons", interrupted)
    assert main(["reasons"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("byok: interrupted (Ctrl-C)")
    assert len(err.splitlines()) == 1

    def types() -> dict[str, Any]:
        raise KeyboardInterrupt

    monkeypatch.setattr("offline_packager.cli.cmd_types", types)
    assert package_main(["types"]) == 130
    assert capsys.readouterr().err.startswith("byok-package: interrupted (Ctrl-C)")


@pytest.mark.azurite
def test_ctrl_c_stops_a_running_watch_with_130(cli_env: Stack) -> None:  # noqa: F811
    proc = subprocess.Popen([BYOK, "watch", "--interval", "0.2"], env=dict(os.environ),
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)  # fmt: skip
    assert proc.stderr is not None
    assert proc.stderr.readline().startswith("watching ")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert err.startswith("byok: interrupted (Ctrl-C)")


def _closed_reader(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run a command whose reader has gone before it writes (what `| head -1` leads to)."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode()


@pytest.mark.azurite
def test_a_reader_that_goes_away_ends_quietly(
    cli_env: Stack,  # noqa: F811  # the fixture imported above
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = dict(os.environ)
    assert _closed_reader([BYOK, "reasons"], env) == (141, "")
    run_json(capsys, "kek", "create", "--name", "pipe-kek", "--size", "2048")
    assert _closed_reader([BYOK, "audit", "export", "--key", "pipe-kek"], env) == (141, "")
    package = str(Path(sys.executable).with_name("byok-package"))
    assert _closed_reader([package, "types"], env) == (141, "")
    # through a real pipe and head, as a person types it
    shell = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {BYOK} reasons | head -1"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert shell.stdout.startswith("too_large")
    assert "Traceback" not in shell.stderr
    assert "Exception ignored" not in shell.stderr


# -- how errors are classified --------------------------------------------------------------------
def test_classify_maps_every_kind_of_error_to_one_exit_code() -> None:
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ServiceRequestError,
    )

    from byok_pipeline.cli.failures import classify
    from byok_pipeline.core.errors import ConfigError, Rejected, TransientError
    from offline_packager.errors import KidError

    assert classify(Rejected("bad_kid", "x"))[:3] == (2, "refused", "bad_kid")
    assert classify(KidError("x"))[:3] == (2, "refused", "bad_kid")
    assert classify(TransientError("x"))[:3] == (1, "failed", "transient")
    assert classify(ConfigError("set X"))[:3] == (1, "failed", "config_error")
    assert classify(ClientAuthenticationError("no token"))[:3] == (1, "failed", "login_required")
    assert classify(ServiceRequestError("refused"))[:3] == (1, "failed", "transient")
    assert classify(HttpResponseError("forbidden"))[:3] == (1, "failed", "service_error")
    err = FileNotFoundError(2, "No such file or directory", "/x")
    assert classify(err) == (1, "failed", "os_error", "No such file or directory (/x)")
    code, _, reason, message = classify(ZeroDivisionError())
    assert (code, reason) == (1, "internal_error")
    assert "ZeroDivisionError" in message
