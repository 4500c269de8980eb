"""Approvals signed with keys generated inside SoftHSM2 (`byok-package approve` with the token
options of `wrap`), verified by the software verifier with the public key read from the token;
and the token signer's refusals."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from softhsm_helpers import (
    KEK_KID,
    PIN_ENV,
    KekFiles,
    SoftHsm,
    approve_args,
    generate_signing_key,
    import_aes,
)

from offline_packager.approval import (
    ApprovalError,
    make_approver,
    parse_approvers,
    sign_approval,
    verify_approval,
)
from offline_packager.cli import main
from offline_packager.errors import Pkcs11Error
from offline_packager.kek import spki_sha256
from offline_packager.pkcs11_signer import (
    CKM_ECDSA,
    CKM_EDDSA,
    CKM_RSA_PKCS_PSS,
    CKM_SHA256_RSA_PKCS_PSS,
    TokenSigner,
    TokenSignerRequest,
    token_signer,
)

pytestmark = pytest.mark.softhsm

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
KINDS = {
    "ec-p256": ("ES256", {CKM_ECDSA}),
    "ec-p384": ("ES384", {CKM_ECDSA}),
    "ed25519": ("EdDSA", {CKM_EDDSA}),
    "rsa-3072": ("PS256", {CKM_SHA256_RSA_PKCS_PSS, CKM_RSA_PKCS_PSS}),
}


def _pem(public_key: Any) -> str:
    pem: bytes = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode()


@pytest.fixture
def package(kek: KekFiles, tmp_path: Path) -> tuple[Path, Path]:
    """A software-wrapped package (the approval only needs its manifest)."""
    out = tmp_path / "payments-2026.byok"
    argv = ["wrap", "--kek", str(kek.pem), "--kek-kid", KEK_KID, "--kek-sha256",
            spki_sha256(kek.private_key.public_key()), "--generate", "ec-p256", "--out", str(out)]  # fmt: skip
    assert main(argv, clock=lambda: NOW) == 0
    return out, tmp_path / "payments-2026.manifest.json"


def _listed_mechanisms(softhsm: SoftHsm) -> set[int]:
    import pkcs11

    token = pkcs11.lib(softhsm.module).get_token(token_label=softhsm.token_label)
    return {int(m) for m in token.slot.get_mechanisms()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_token_signed_approval_verifies_in_software(
    kind: str, softhsm: SoftHsm, pin_env: str, label: str, package: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    alg, mechanisms = KINDS[kind]
    if not mechanisms & _listed_mechanisms(softhsm):
        pytest.skip(f"this SoftHSM2 build lists none of {sorted(mechanisms)} needed for {alg}")
    with softhsm.session() as session:
        public_key = generate_signing_key(session, kind, label)
    byok, manifest = package
    out = byok.with_name("payments-2026.approval-carol.json")
    capsys.readouterr()
    rc = main(approve_args(softhsm, manifest, out, label, "carol", "--json"), clock=lambda: NOW)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(captured.out)
    assert result["alg"] == alg
    assert result["signer_spki_sha256"] == spki_sha256(public_key)
    assert result["signer"]["kind"] == "pkcs11"
    assert softhsm.pin not in captured.out + captured.err
    data = out.read_bytes()
    assert softhsm.pin.encode() not in data
    approvers = parse_approvers(
        {"approvers": [{"id": "carol", "public_key_pem": _pem(public_key)}]}
    )
    claims = verify_approval(
        data, manifest=manifest.read_bytes(), approver=approvers["carol"], now=NOW
    )
    assert (claims.alg, claims.key_name, claims.approver_id) == (alg, "payments-2026", "carol")
    assert claims.not_after == NOW + timedelta(days=7)


def test_two_token_approvers_and_inspect(
    softhsm: SoftHsm, pin_env: str, label: str, package: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Dual control: two approvers with their own token keys; inspect counts both."""
    with softhsm.session() as session:
        keys = {
            "alice": generate_signing_key(session, "ec-p256", f"{label}-a"),
            "bob": generate_signing_key(session, "ec-p384", f"{label}-b"),
        }
    byok, manifest = package
    for approver_id, suffix in (("alice", "a"), ("bob", "b")):
        out = byok.with_name(f"payments-2026.approval-{approver_id}.json")
        argv = approve_args(softhsm, manifest, out, f"{label}-{suffix}", approver_id)
        assert main(argv, clock=lambda: NOW) == 0
    text = capsys.readouterr().out
    assert "KEK SPKI SHA-256" in text  # the facts were printed
    approvers = byok.with_name("approvers.json")
    approvers.write_text(
        json.dumps({"approvers": [{"id": i, "public_key_pem": _pem(k)} for i, k in keys.items()]})
    )
    rc = main(["inspect", str(byok), "--approvers", str(approvers), "--json"], clock=lambda: NOW)
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert report["approved_by"] == ["alice", "bob"]
    # bob's key may not approve as alice
    swapped = make_approver("alice", keys["bob"])
    with pytest.raises(ApprovalError, match=r"does not match|does not verify") as caught:
        verify_approval(
            byok.with_name("payments-2026.approval-alice.json").read_bytes(),
            manifest=manifest.read_bytes(), approver=swapped, now=NOW,
        )  # fmt: skip
    assert caught.value.reason == "approval_invalid"


def _aes_key(session: Any, label: str) -> None:
    import_aes(session, bytes(range(32)), label)


REFUSALS: dict[str, tuple[str, Any]] = {
    "no key with the label": ("key_not_found", None),
    "secret key, not a private key": ("key_not_found", _aes_key),
    "RSA-2048 is too small": (
        "bad_signer_key",
        lambda s, lbl: generate_signing_key(s, "rsa-2048", lbl),
    ),
    "P-521 is not accepted": (
        "bad_signer_key",
        lambda s, lbl: generate_signing_key(s, "ec-p521", lbl),
    ),
    "two keys with the label": (
        "key_ambiguous",
        lambda s, lbl: [generate_signing_key(s, "ec-p256", lbl) for _ in range(2)],
    ),
    "wrong PIN": ("pin_incorrect", lambda s, lbl: generate_signing_key(s, "ec-p256", lbl)),
    "unknown token": ("token_not_found", lambda s, lbl: generate_signing_key(s, "ec-p256", lbl)),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_token_signer_refusals(
    case: str, softhsm: SoftHsm, pin_env: str, label: str, package: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    reason, setup = REFUSALS[case]
    if setup is not None:
        with softhsm.session() as session:
            setup(session, label)
    if case == "wrong PIN":
        monkeypatch.setenv(PIN_ENV, "0000-wrong")
    byok, manifest = package
    out = byok.with_name("payments-2026.approval-carol.json")
    argv = approve_args(softhsm, manifest, out, label, "carol")
    if case == "unknown token":
        argv[argv.index("--token-label") + 1] = "no-such-token"
    rc = main(argv, clock=lambda: NOW)
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"byok-package: refused [{reason}]: "), lines[0]
    assert "0000-wrong" not in captured.err + captured.out
    assert softhsm.pin not in captured.err + captured.out
    assert not out.exists()


def test_pss_fallback_and_missing_mechanism(
    softhsm: SoftHsm, pin_env: str, label: str, package: tuple[Path, Path]
) -> None:
    """PS256 through CKM_RSA_PKCS_PSS over a software digest (for tokens without the hashing
    mechanism), and a token that lists no usable mechanism."""
    with softhsm.session() as session:
        public_key = generate_signing_key(session, "rsa-3072", label)
    _, manifest = package
    request = TokenSignerRequest(
        module=softhsm.module,
        token_label=softhsm.token_label,
        pin=softhsm.pin.encode,
        key_label=label,
    )
    with token_signer(request) as signer:
        assert signer.mechanism == "CKM_SHA256_RSA_PKCS_PSS"
        fallback = TokenSigner(signer._p11, signer._key, signer.public_key, {CKM_RSA_PKCS_PSS})
        assert fallback.mechanism == "CKM_RSA_PKCS_PSS"
        data = sign_approval(
            manifest=manifest.read_bytes(), approver_id="carol", key_name="payments-2026",
            not_after=NOW + timedelta(hours=1), signer=fallback, now=NOW,
        )  # fmt: skip
        with pytest.raises(Pkcs11Error) as caught:
            TokenSigner(signer._p11, signer._key, signer.public_key, {CKM_ECDSA})
        assert caught.value.reason == "mechanism_unsupported"
    approver = make_approver("carol", public_key)
    assert (
        verify_approval(data, manifest=manifest.read_bytes(), approver=approver, now=NOW).alg
        == "PS256"
    )
