"""KEK attestation through the CLIs against the emulator: the README's ceremony block, verbatim,
refused without the emulator's TEST root and accepted with it; `byok kek attest`; the adapter's
refusals."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pipeline_support import Stack
from test_cli import audit_keys, cli_env, run_json  # noqa: F401  # fixtures, used by name
from testsupport import REPO

from byok_pipeline.cli.main import main
from byok_pipeline.core.errors import Rejected
from offline_packager.cli import main as package_main
from offline_packager.kek import load_kek_pem
from offline_packager.kid import parse_kid

pytestmark = pytest.mark.azurite
MARKER = "# kek-attestation-ceremony"


def readme_block() -> list[list[str]]:
    """The commands of the README's KEK attestation block (comments dropped)."""
    text = (REPO / "README.md").read_text()
    block = text.split(MARKER + "\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def _kek(capsys: pytest.CaptureFixture[str], name: str) -> str:
    created = run_json(capsys, "kek", "create", "--name", name, "--size", "2048")
    return str(created["kid"])


def test_readme_block_runs_refused_without_the_test_root_accepted_with_it(
    cli_env: Stack,  # noqa: F811  # the fixture imported above
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = cli_env
    monkeypatch.chdir(tmp_path)
    commands = readme_block()
    assert [c[:2] for c in commands] == [
        ["byok", "kek"],
        ["byok-package", "verify-kek-attestation"],
        ["byok-package", "wrap"],
        ["byok-package", "inspect"],
    ]
    kid = _kek(capsys, "readme-att-kek")
    (tmp_path / "payments-2026.pem").write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    root = str(stack.hsm.data_dir / "attestation-test-root.pem")
    sha256 = ""
    for command in commands:
        argv = [{"KID": kid, "SHA256": sha256}.get(a, a) for a in command]
        if argv[0] == "byok":
            assert main(argv[1:]) == 0, capsys.readouterr().err
            sha256 = load_kek_pem((tmp_path / "KEK.pem").read_bytes()).fingerprint
            continue
        capsys.readouterr()
        assert package_main(argv[1:]) == 2  # the emulator's TEST root is not trusted by default
        assert "[attestation_chain_invalid]" in capsys.readouterr().err
        assert package_main([*argv[1:], "--trust-test-root", root]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "KEK attest.:  verified, chain to test-root" in out
    attestation = (tmp_path / "KEK.attestation.json").read_bytes()
    digest = hashlib.sha256(attestation).hexdigest()
    manifest = json.loads((tmp_path / "payments-2026.manifest.json").read_text())
    recorded = manifest["kek"]["attestation"]
    assert (recorded["sha256"], recorded["trust_anchor"]) == (digest, "test-root")
    assert recorded["attested_key_id"] == kid
    # the download is audited with the attestation's SHA-256
    audit = [json.loads(line) for line in (stack.tmp / "audit.jsonl").read_text().splitlines()]
    downloads = [e for e in audit if e["event"] == "byok.kek.downloaded" and e["kek_kid"] == kid]
    assert [e.get("attestation_sha256") for e in downloads] == [digest]


def test_kek_attest_saves_the_hsms_answer(
    cli_env: Stack,  # noqa: F811  # the fixture imported above
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    kid = _kek(capsys, "attest-only-kek")
    out = tmp_path / "a.json"
    result = run_json(capsys, "kek", "attest", "--name", "attest-only-kek", "--out", str(out))
    assert result["kid"] == kid
    assert result["attestation_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert "pem" not in result
    doc = json.loads(out.read_bytes())
    assert doc["attributes"]["attestation"]["version"] == "MRVL-1"
    # never replaces a file without --force; unknown names are not_found
    assert run_json(capsys, "kek", "attest", "--kid", kid, "--out", str(out), expect=2)
    run_json(capsys, "kek", "attest", "--kid", kid, "--out", str(out), "--force")
    refused = run_json(
        capsys, "kek", "attest", "--name", "no-such-kek", "--out", str(out), expect=2
    )
    assert refused["reason"] == "not_found"
    # the human output tells the custodian what to run offline
    assert main(["kek", "download", "--kid", kid, "--out", str(tmp_path / "k.pem"),
                 "--attestation", str(tmp_path / "k.json")]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert re.search(r"byok-package verify-kek-attestation \S+k\.json --kek \S+k\.pem", text)


def test_adapter_refuses_missing_keys_and_answers_without_attestation(stack: Stack) -> None:
    hsm = stack.deps.hsm
    kid = parse_kid(stack.kek_kid)
    body = hsm.key_attestation(kid, request_id="t")
    assert json.loads(body)["attributes"]["attestation"]["version"] == "MRVL-1"
    missing = parse_kid(f"{kid.vault_url}/keys/{kid.name}/{'0' * 32}")
    with pytest.raises(Rejected) as info:
        hsm.key_attestation(missing, request_id="t")
    assert info.value.reason == "kek_missing"


def test_adapter_refuses_an_answer_without_attestation(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from azure.core.rest import HttpRequest

    hsm = stack.deps.hsm
    real = hsm.client.send_request

    def plain_key(request: HttpRequest, **kwargs: Any) -> Any:
        """A service that ignores the attestation path and answers the plain key bundle."""
        url = request.url.replace("/attestation", "")
        return real(HttpRequest("GET", url), **kwargs)

    monkeypatch.setattr(hsm.client, "send_request", plain_key)
    with pytest.raises(Rejected) as info:
        hsm.key_attestation(parse_kid(stack.kek_kid), request_id="t")
    assert info.value.reason == "hsm_refused"
