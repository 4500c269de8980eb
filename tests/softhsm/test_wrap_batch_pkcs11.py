"""``byok-package wrap-batch`` with token keys (SoftHSM2): every label in one session with one
login, a missing label refused alone, names from a CSV's ``pkcs11_label`` column, and a wrong PIN
refusing the batch before anything is written."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from softhsm_helpers import KEK_KID, PIN_ENV, KekFiles, SoftHsm, import_aes, import_ec

import offline_packager.pkcs11_source as source
from offline_packager.cli import main
from offline_packager.kek import spki_sha256
from offline_packager.package_format import parse_package
from offline_packager.pkcs11_quirks import SOFTHSM_PADDING_WARNING, strip_zero_padding
from offline_packager.pkcs11_source import EC_PARAMS_BY_CRV
from offline_packager.secret import SecretBytes
from offline_packager.wrap import unwrap_target

pytestmark = pytest.mark.softhsm


@pytest.fixture
def logins(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each token login (C_OpenSession + C_Login) of the code under test: its ``rw`` flag."""
    opened: list[bool] = []
    real = source._open_session

    @contextmanager
    def counting(p11: Any, token: Any, pin: bytes, *, rw: bool) -> Iterator[Any]:
        opened.append(rw)
        with real(p11, token, pin, rw=rw) as session:
            yield session

    monkeypatch.setattr(source, "_open_session", counting)
    return opened


@pytest.fixture
def token_keys(softhsm: SoftHsm) -> dict[str, Any]:
    """Two AES keys and an EC P-256 key pair in the token, under fresh labels."""
    tag = secrets.token_hex(3)
    keys: dict[str, Any] = {
        f"aes-{tag}-1": os.urandom(32),
        f"aes-{tag}-2": os.urandom(16),
        f"ec-{tag}": ec.generate_private_key(ec.SECP256R1()),
    }
    with softhsm.session() as session:
        for label, key in keys.items():
            if isinstance(key, bytes):
                import_aes(session, key, label)
            else:
                import_ec(session, key, EC_PARAMS_BY_CRV["P-256"], label)
    return keys


@dataclass(frozen=True)
class TokenBatch:
    """A ``wrap-batch`` against the session's token: its output folder and its logins."""

    softhsm: SoftHsm
    kek: KekFiles
    out: Path
    logins: list[bool]

    def argv(self, *extra: str) -> list[str]:
        return ["wrap-batch", "--kek", str(self.kek.pem), "--kek-kid", KEK_KID,
                "--kek-sha256", spki_sha256(self.kek.private_key.public_key()),
                "--pkcs11-module", self.softhsm.module, "--token-label", self.softhsm.token_label,
                "--pin-env", PIN_ENV, "--out-dir", str(self.out), "--json", *extra]  # fmt: skip

    def plaintext(self, name: str) -> SecretBytes:
        package = parse_package((self.out / f"{name}.byok").read_bytes())
        return unwrap_target(self.kek.private_key, package.ciphertext)


@pytest.fixture
def batch(
    softhsm: SoftHsm, kek: KekFiles, pin_env: str, logins: list[bool], tmp_path: Path
) -> TokenBatch:
    (tmp_path / "out").mkdir()
    return TokenBatch(softhsm, kek, tmp_path / "out", logins)


def test_a_label_list_is_wrapped_in_one_session_with_one_login(
    batch: TokenBatch, token_keys: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    aes1, aes2, ec1 = token_keys
    missing = f"missing-{secrets.token_hex(3)}"
    out = batch.out
    argv = batch.argv("--labels", f"{aes1},{aes2}", "--labels", f"{ec1},{missing}",
                 "--generate", "oct-128:1")  # fmt: skip
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    assert batch.logins == [False]  # one read-only session, one login, for every label
    summary = json.loads(captured.out)
    assert {k["name"]: k["reason"] for k in summary["keys"]} == {
        "gen-oct-128-1": None,
        aes1: None,
        aes2: None,
        ec1: None,
        missing: "key_not_found",
    }
    for label in (aes1, aes2):
        assert batch.plaintext(label).reveal() == token_keys[label]
    der = strip_zero_padding(batch.plaintext(ec1)).reveal()  # SoftHSM's quirk
    unwrapped = serialization.load_der_private_key(der, password=None)
    assert isinstance(unwrapped, ec.EllipticCurvePrivateKey)
    assert unwrapped.private_numbers() == token_keys[ec1].private_numbers()
    manifest = json.loads((out / f"{ec1}.manifest.json").read_text())
    assert manifest["generator"]["key_source"]["kind"] == "pkcs11"
    assert manifest["generator"]["key_source"]["key_label"] == ec1
    assert manifest["target"]["fingerprint"]["value"] == spki_sha256(token_keys[ec1].public_key())
    errors = captured.err.splitlines()
    assert errors.count(f"byok-package: warning: {SOFTHSM_PADDING_WARNING}") == 1
    refused = f"refused [key_not_found]: {missing}: the token holds no private or secret key"
    assert [line for line in errors if "refused" in line] == [
        f"byok-package: {refused} labelled {missing!r}"
    ]
    assert not list(out.glob(f"{missing}*"))
    for blob in (captured.out, captured.err, *(p.read_text() for p in out.iterdir())):
        assert batch.softhsm.pin not in blob


def test_a_csv_names_token_keys_and_states_their_types(
    batch: TokenBatch,
    token_keys: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    aes1, _, ec1 = token_keys
    (tmp_path / "keys.csv").write_text(
        f"name,pkcs11_label,type,key_ops\nsigning-2026,{ec1},ec-p256,sign\n"
        f"wrong-type,{aes1},oct-128,\n"
    )
    out = batch.out
    assert main(batch.argv("--keys", str(tmp_path / "keys.csv"))) == 2
    summary = json.loads(capsys.readouterr().out)
    assert [(k["name"], k["reason"]) for k in summary["keys"]] == [
        ("signing-2026", None),
        ("wrong-type", "target_type_mismatch"),
    ]
    assert batch.logins == [False]
    manifest = json.loads((out / "signing-2026.manifest.json").read_text())
    assert manifest["generator"]["key_source"]["key_label"] == ec1
    assert manifest["target"]["key_ops"] == ["sign"]
    assert sorted(p.name for p in out.iterdir()) == [
        "signing-2026.byok",
        "signing-2026.manifest.json",
    ]


def test_a_wrong_pin_refuses_the_batch_before_any_key(
    batch: TokenBatch,
    token_keys: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PIN_ENV, "not-the-pin")
    labels = ",".join(token_keys)
    assert main(batch.argv("--labels", labels, "--generate", "oct-256:2")) == 2
    refusal = json.loads(capsys.readouterr().out)
    assert refusal["reason"] == "pin_incorrect"
    assert batch.logins == [False]
    assert list(batch.out.iterdir()) == []  # not even the generated keys: the batch never started
