"""`byok upload` is a gate (issue 14, part 1): what the pipeline would refuse is refused before
anything leaves the machine (exit 2, the pipeline's reason code), and plaintext key material is
never sent nor shown. `--force-offline` skips only the checks against the HSM."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pipeline_support import Package, Stack
from test_cli import audit_keys, cli_env, run_json  # noqa: F401  # fixtures, used by name

from byok_pipeline.cli.main import main
from byok_pipeline.cli.upload import manifest_json

pytestmark = pytest.mark.azurite


@pytest.fixture
def gate_env(cli_env: Stack) -> Stack:  # noqa: F811  # the fixture imported above
    """The local stack, with the environment a person's `byok` sees."""
    return cli_env


def _write(tmp: Path, pkg: Package, *, name: str | None = None) -> Path:
    """The package and its manifest as the custodian carries them."""
    stem = name or pkg.name.removesuffix(".byok")
    path = tmp / f"{stem}.byok"
    path.write_bytes(pkg.data)
    (tmp / f"{stem}.manifest.json").write_bytes(manifest_json(pkg.manifest))
    return path


def _nothing_sent(stack: Stack) -> None:
    s = stack.settings
    assert stack.blobs(s.incoming_container) == []
    assert stack.blobs(s.approvals_container) == []


def _refused(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    """Run ``byok upload ARGV --json``: exit 2 and one line on stderr; the JSON refusal."""
    rc = main(["upload", *argv, "--json"])
    out = capsys.readouterr()
    assert rc == 2, out.err
    assert len(out.err.splitlines()) == 1, out.err
    assert "Traceback" not in out.err
    refusal: dict[str, Any] = json.loads(out.out)
    assert refusal["status"] == "refused"
    return refusal


# -- plaintext key material never leaves ----------------------------------------------------------
def _pkcs8_pem() -> bytes:
    return rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _ec_der(fmt: serialization.PrivateFormat) -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER, fmt, serialization.NoEncryption()
    )


def _encrypted_pem() -> bytes:
    return ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )


def _jwk_rsa() -> bytes:
    numbers = rsa.generate_private_key(65537, 2048).private_numbers()

    def b64(value: int) -> str:
        raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    pub = numbers.public_numbers
    return json.dumps(
        {"kty": "RSA", "n": b64(pub.n), "e": b64(pub.e), "d": b64(numbers.d),
         "p": b64(numbers.p), "q": b64(numbers.q)}
    ).encode()  # fmt: skip


PLAINTEXT: dict[str, Callable[[], bytes]] = {
    "PEM PKCS#8": _pkcs8_pem,
    "PEM encrypted": _encrypted_pem,
    "DER PKCS#8": lambda: _ec_der(serialization.PrivateFormat.PKCS8),
    "DER SEC1": lambda: _ec_der(serialization.PrivateFormat.TraditionalOpenSSL),
    "JWK RSA": _jwk_rsa,
    "JWK set, oct": lambda: json.dumps(
        {"keys": [{"kty": "oct", "k": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()}]}
    ).encode(),
    "raw AES-256": lambda: secrets.token_bytes(32),
    "raw AES-128 as hex": lambda: secrets.token_hex(16).encode() + b"\n",
}


@pytest.mark.parametrize("kind", list(PLAINTEXT))
def test_plaintext_keys_are_refused_and_never_sent(
    kind: str, gate_env: Stack, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    stack = gate_env
    data = PLAINTEXT[kind]()
    path = tmp_path / "oops.byok"
    path.write_bytes(data)
    for extra in ([], ["--force-offline"]):  # the local part is never skipped
        refusal = _refused(capsys, str(path), *extra)
        assert refusal["reason"] == "plaintext_key"
        assert refusal["message"].startswith("STOP: ")
        assert "nothing was sent" in refusal["message"]
        # not a byte of it is shown: no line of a PEM body, no hex or base64 of it
        for chunk in data.splitlines():
            if len(chunk) >= 16 and b"-----" not in chunk:
                assert chunk.decode(errors="replace") not in json.dumps(refusal)
    _nothing_sent(stack)


def test_a_private_key_as_manifest_or_approval_is_refused_before_anything_is_sent(
    gate_env: Stack, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    stack = gate_env
    path = _write(tmp_path, stack.package("oct-256", "gate-beside"))
    approval = tmp_path / "gate-beside.approval-alice.json"
    approval.write_bytes(_jwk_rsa())
    assert _refused(capsys, str(path))["reason"] == "plaintext_key"
    approval.unlink()
    (tmp_path / "gate-beside.manifest.json").write_bytes(_pkcs8_pem())
    assert _refused(capsys, str(path))["reason"] == "plaintext_key"
    _nothing_sent(stack)


# -- the local checks -----------------------------------------------------------------------------
def test_local_refusals(
    gate_env: Stack, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    stack = gate_env
    assert _refused(capsys, str(tmp_path / "missing.byok"))["reason"] == "file_not_found"
    (tmp_path / "folder.byok").mkdir()
    assert _refused(capsys, str(tmp_path / "folder.byok"))["reason"] == "unreadable_input"
    (tmp_path / "garbage.byok").write_text('{"not": "a package"}')
    refusal = _refused(capsys, str(tmp_path / "garbage.byok"), "--force-offline")
    assert refusal["reason"] == "malformed_package"
    other = stack.package(
        "oct-256", "gate-other", kid="https://other.managedhsm.azure.net/keys/k/" + "a" * 32
    )
    refusal = _refused(capsys, str(_write(tmp_path, other)), "--force-offline")
    assert refusal["reason"] == "kid_wrong_hsm"
    pkg = stack.package("ec-p256", "gate-manifest")
    path = _write(tmp_path, pkg)
    (tmp_path / "gate-manifest.manifest.json").write_bytes(
        manifest_json({**pkg.manifest, "package": {**pkg.manifest["package"], "sha256": "0" * 64}})
    )
    assert _refused(capsys, str(path), "--force-offline")["reason"] == "manifest_mismatch"
    _nothing_sent(stack)


# -- the checks against the HSM -------------------------------------------------------------------
def _kek(stack: Stack, *, ops: list[str] | None = None, **props: Any) -> str:
    client = stack.hsm.key_client()
    key = client.create_rsa_key(
        f"gate-kek-{secrets.token_hex(3)}", size=3072, hardware_protected=True,
        key_operations=ops or ["import"],
    )  # fmt: skip
    if props:
        client.update_key_properties(key.name, key.properties.version, **props)
    return str(key.id)


KEK_CASES: dict[str, Callable[[Stack], str]] = {
    "kek_expired": lambda s: _kek(s, expires_on=datetime.now(UTC) - timedelta(days=1)),
    "kek_disabled": lambda s: _kek(s, enabled=False),
    "kek_not_import_only": lambda s: _kek(s, ops=["wrapKey", "unwrapKey"]),
    "kek_missing": lambda s: s.kek_kid.rsplit("/", 1)[0] + "/" + "0" * 32,
}


@pytest.mark.parametrize("reason", list(KEK_CASES))
def test_the_kek_is_checked_in_the_hsm_unless_forced_offline(
    reason: str, gate_env: Stack, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    stack = gate_env
    name = f"gate-{reason.replace('_', '-')}"
    path = _write(tmp_path, stack.package("oct-256", name, kid=KEK_CASES[reason](stack)))
    assert _refused(capsys, str(path))["reason"] == reason
    _nothing_sent(stack)
    # --force-offline skips only the online part: the pipeline refuses it later
    uploaded = run_json(capsys, "upload", str(path), "--force-offline")
    assert uploaded["checks"] == {"local": "passed", "online": "skipped: --force-offline"}
    assert stack.blobs(stack.settings.incoming_container) == [f"{name}.byok"]
    # while it waits there, the same name is not uploaded again
    assert _refused(capsys, str(path), "--force-offline")["reason"] == "duplicate_upload"


def test_already_imported_and_existing_names(
    gate_env: Stack, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    stack = gate_env
    first = _write(tmp_path, stack.package("ec-p256", "gate-twice"))
    uploaded = run_json(capsys, "upload", str(first))
    assert uploaded["checks"]["online"]["kek_kid"] == stack.kek_kid
    assert uploaded["checks"]["online"]["new_version_of"] is None
    assert main(["watch", "--once"]) == 0
    capsys.readouterr()
    # the exact package again: already imported, nothing to upload
    refusal = _refused(capsys, str(first))
    assert refusal["reason"] == "already_imported"
    assert "/keys/gate-twice/" in refusal["message"]
    # another key under the same name: only with --new-version
    second = tmp_path / "next"
    second.mkdir()
    path = _write(second, stack.package("ec-p256", "gate-twice"))
    assert _refused(capsys, str(path))["reason"] == "key_exists"
    assert stack.blobs(stack.settings.incoming_container) == []
    again = run_json(capsys, "upload", str(path), "--new-version")
    assert again["checks"]["online"]["new_version_of"].startswith(
        f"{stack.hsm.url}/keys/gate-twice/"
    )


def test_new_version_follows_the_protection_of_existing_keys(
    gate_env: Stack, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--new-version never overrides the pipeline's rules: a key it did not import, and a KEK,
    are never given a version."""
    stack = gate_env
    name = f"gate-foreign-{secrets.token_hex(3)}"
    stack.hsm.key_client().create_oct_key(name, size=256, hardware_protected=True)
    path = _write(tmp_path, stack.package("oct-256", name))
    refusal = _refused(capsys, str(path), "--new-version")
    assert refusal["reason"] == "existing_key_protected"
    kek_named = _write(tmp_path, stack.package("oct-256", stack.kek_name))
    assert _refused(capsys, str(kek_named), "--new-version")["reason"] == "existing_key_protected"
    _nothing_sent(stack)


def test_an_unreachable_hsm_fails_and_offers_force_offline(
    gate_env: Stack,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = gate_env
    from testsupport import closed_port

    dead = f"https://127.0.0.1:{closed_port()}"
    pkg = stack.package("oct-128", "gate-dead-hsm", kid=f"{dead}/keys/kek/{'a' * 32}")
    path = _write(tmp_path, pkg)
    assert main(["upload", str(path), "--hsm-url", dead]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert f"[hsm_unreachable]: reading the KEK: the HSM at {dead} is unreachable" in err
    assert "--force-offline" in err
    _nothing_sent(stack)
    monkeypatch.delenv("BYOK_HSM_URL")  # storage alone: the online part is skipped, and said so
    assert main(["upload", str(path)]) == 0
    out = capsys.readouterr().out
    assert "checked locally only (BYOK_HSM_URL is not set)" in out


# -- the README's block, verbatim -----------------------------------------------------------------
def readme_block(marker: str = "# upload-gate") -> list[list[str]]:
    """The commands of a README block (comments dropped)."""
    import shlex

    from testsupport import REPO

    block = (REPO / "README.md").read_text().split(marker + "\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line and not line.startswith("#")]


def test_the_readme_block_runs(
    gate_env: Stack,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first version; a second one (refused without --new-version); a third with the HSM's
    checks skipped."""
    stack = gate_env
    monkeypatch.chdir(tmp_path)
    first, second, third = readme_block()
    assert [c[:2] for c in (first, second, third)] == [["byok", "upload"]] * 3
    _write(tmp_path, stack.package("ec-p256", "payments-2026"))
    assert main(first[1:]) == 0, capsys.readouterr().err
    assert main(["watch", "--once"]) == 0
    capsys.readouterr()
    _write(tmp_path, stack.package("ec-p256", "payments-2026"))  # another key, the same name
    assert _refused(capsys, *first[2:])["reason"] == "key_exists"
    assert main(second[1:]) == 0, capsys.readouterr().err
    assert "it will be the next version of" in capsys.readouterr().out
    assert main(["watch", "--once"]) == 0
    capsys.readouterr()
    _write(tmp_path, stack.package("ec-p256", "payments-2026"))
    assert main([*third[1:], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checks"]["online"] == "skipped: --force-offline"
    versions = stack.hsm.key_client().list_properties_of_key_versions("payments-2026")
    assert len(list(versions)) == 2


def test_an_approved_check_value_the_hsm_cannot_compute_is_refused_before_upload(
    gate_env: Stack, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Under a rule that needs approvals, a wrap-only AES key's check value could never be
    verified by the pipeline (fingerprint_unverifiable): the gate says so before anything goes,
    whether or not the approvals are there yet."""
    stack = gate_env
    tag = secrets.token_hex(3)
    approver = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = approver.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    policy = {
        "policy_version": 1,
        "approver_groups": {"custodians": {"approvers": [{"id": "alice", "public_key_pem": pem}]}},
        "rules": [{"prefix": f"gwrap{tag}-", "approvals": {"group": "custodians", "required": 1}}],
    }
    stack.deps.authorization.put_policy(json.dumps(policy).encode())  # this test's stack only
    wrap_only = stack.package("oct-256", f"gwrap{tag}-k", key_ops=("wrapKey", "unwrapKey"))
    refusal = _refused(capsys, str(_write(tmp_path, wrap_only)))
    assert refusal["reason"] == "fingerprint_unverifiable"
    assert "encrypt" in refusal["message"]
    _nothing_sent(stack)
    can_encrypt = stack.package("oct-256", f"gwrap{tag}-e", key_ops=("encrypt", "decrypt"))
    assert main(["upload", str(_write(tmp_path, can_encrypt)), "--json"]) == 0  # approvals later
    uploaded = json.loads(capsys.readouterr().out)
    assert uploaded["checks"]["online"]["approvals_missing"] == {"missing": 1, "required": 1}
