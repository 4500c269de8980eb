"""HSM mode against SoftHSM2: packages made in the token unwrap with `cryptography`, match their
manifests, show SoftHSM's zero padding exactly, and never put the plaintext in an output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from softhsm_helpers import (
    KekFiles,
    SoftHsm,
    import_aes,
    import_ec,
    import_rsa,
    leaked_forms,
    wrap_args,
)

from offline_packager.cli import main
from offline_packager.kek import check_kek, spki_sha256
from offline_packager.keytypes import TARGET_TYPES, TYPE_NAMES, TargetType, kwp_length_plausible
from offline_packager.package_format import b64url_decode
from offline_packager.pkcs11_quirks import SOFTHSM_PADDING_WARNING, strip_zero_padding
from offline_packager.pkcs11_source import (
    EC_PARAMS_BY_CRV,
    MECHANISM_TWO_STEP,
    TokenRequest,
    _wrap_two_step,
    wrap_in_token,
)
from offline_packager.secret import SecretBytes
from offline_packager.target_keys import generate_target, key_check_value
from offline_packager.wrap import oaep_sha1, unwrap_target

pytestmark = pytest.mark.softhsm


def _run_wrap(
    softhsm: SoftHsm, kek: KekFiles, out: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[dict[str, Any], bytes, str, str]:
    """Run the CLI in-process; return the manifest, the ciphertext, stdout and stderr."""
    rc = main(wrap_args(softhsm, kek, out, *extra))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    manifest = json.loads(out.with_name(out.stem + ".manifest.json").read_text())
    package = json.loads(out.read_text())
    return manifest, b64url_decode(package["ciphertext"]), captured.out, captured.err


def _check_private_key(
    plaintext: SecretBytes, target: TargetType, manifest: dict[str, Any]
) -> PrivateKeyTypes:
    """The unwrapped RSA/EC plaintext is PKCS#8 plus exactly SoftHSM's zero padding, and its
    public key is the one the manifest names."""
    der = strip_zero_padding(plaintext).reveal()
    assert len(plaintext) % 8 == 0
    assert len(plaintext) - len(der) == (-len(der)) % 8
    key = serialization.load_der_private_key(der, password=None)
    if target.family == "RSA":
        assert isinstance(key, rsa.RSAPrivateKey)
        assert key.key_size == target.key_size
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == target.curve().name
    public = key.public_key()
    assert manifest["target"]["fingerprint"] == {
        "kind": "spki-sha256",
        "value": spki_sha256(public),
    }
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    assert manifest["target"]["public_key_pem"] == pem
    return key


@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_generated_in_token_unwraps_with_cryptography(
    type_name: str,
    softhsm: SoftHsm,
    kek: KekFiles,
    pin_env: str,
    label: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = TARGET_TYPES[type_name]
    out = tmp_path / "generated.byok"
    manifest, ciphertext, _, stderr = _run_wrap(
        softhsm, kek, out, capsys, "--generate", type_name, "--key-label", label
    )
    # RSA/EC packages from SoftHSM are flagged as test-only on stderr; AES ones are not.
    warning = f"byok-package: warning: {SOFTHSM_PADDING_WARNING}"
    assert stderr.splitlines() == ([] if target.family == "oct" else [warning])

    assert manifest["target"]["type"] == type_name
    assert manifest["kek"]["spki_sha256"] == check_kek(kek.private_key.public_key()).fingerprint
    source = manifest["generator"]["key_source"]
    assert source["kind"] == "pkcs11"
    assert source["token_model"] == "SoftHSM v2"
    assert source["manufacturer"] == "SoftHSM project"
    assert source["firmware"].startswith("2.")
    assert source["token_label"] == softhsm.token_label
    assert source["key_label"] == label
    assert source["mechanism"] == MECHANISM_TWO_STEP
    # RSA-OAEP block of the 2048-bit KEK first, then a KWP block plausible for the type.
    assert kwp_length_plausible(target, len(ciphertext) - 256)

    plaintext = unwrap_target(kek.private_key, ciphertext)
    if target.family == "oct":
        assert target.key_size is not None
        assert len(plaintext) == target.key_size // 8
        assert manifest["target"]["fingerprint"] == {
            "kind": "kcv",
            "value": key_check_value(plaintext),
        }
    else:
        _check_private_key(plaintext, target, manifest)

    # The key stays in the token: persistent, sensitive, extractable, labelled, with explicit
    # usage rights and none to wrap, unwrap or derive.
    from pkcs11 import Attribute, ObjectClass

    with softhsm.session() as session:
        objects = list(session.get_objects({Attribute.LABEL: label}))
        classes = sorted(str(o[Attribute.CLASS]) for o in objects)
        wanted = ObjectClass.SECRET_KEY if target.family == "oct" else ObjectClass.PRIVATE_KEY
        (key,) = [o for o in objects if o[Attribute.CLASS] == wanted]
        assert key[Attribute.TOKEN] is True
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.EXTRACTABLE] is True
        assert len(classes) == (1 if target.family == "oct" else 2)
        assert {name: _rights(o) for name, o in _by_class(objects).items()} == EXPECTED_RIGHTS[
            target.family
        ]

    # And the package passes `inspect` with its manifest.
    assert main(["inspect", str(out), "--kek", str(kek.pem)]) == 0, capsys.readouterr().out


# What generated targets may do (CKA_WRAP / CKA_UNWRAP / CKA_DERIVE always false): by family,
# then by object class; an attribute that the class does not have is absent.
EXPECTED_RIGHTS: dict[str, dict[str, dict[str, bool]]] = {
    "RSA": {
        "private": {"SIGN": True, "DECRYPT": True, "UNWRAP": False, "DERIVE": False},
        "public": {"VERIFY": True, "ENCRYPT": True, "WRAP": False, "DERIVE": False},
    },
    "EC": {
        "private": {"SIGN": True, "DECRYPT": False, "UNWRAP": False, "DERIVE": False},
        "public": {"VERIFY": True, "ENCRYPT": False, "WRAP": False, "DERIVE": False},
    },
    "oct": {
        "secret": {
            "ENCRYPT": True,
            "DECRYPT": True,
            "SIGN": False,
            "VERIFY": False,
            "WRAP": False,
            "UNWRAP": False,
            "DERIVE": False,
        }
    },
}
RIGHTS_BY_CLASS = {
    "private": ("SIGN", "DECRYPT", "UNWRAP", "DERIVE"),
    "public": ("VERIFY", "ENCRYPT", "WRAP", "DERIVE"),
    "secret": ("ENCRYPT", "DECRYPT", "SIGN", "VERIFY", "WRAP", "UNWRAP", "DERIVE"),
}


def _by_class(objects: list[Any]) -> dict[str, Any]:
    from pkcs11 import Attribute, ObjectClass

    names = {
        ObjectClass.PRIVATE_KEY: "private",
        ObjectClass.PUBLIC_KEY: "public",
        ObjectClass.SECRET_KEY: "secret",
    }
    return {names[o[Attribute.CLASS]]: o for o in objects}


def _rights(obj: Any) -> dict[str, bool]:
    from pkcs11 import Attribute, ObjectClass

    kind = {ObjectClass.PRIVATE_KEY: "private", ObjectClass.PUBLIC_KEY: "public"}.get(
        obj[Attribute.CLASS], "secret"
    )
    return {name: bool(obj[Attribute[name]]) for name in RIGHTS_BY_CLASS[kind]}


def _import_known(
    session: Any, type_name: str, label: str
) -> tuple[PrivateKeyTypes | bytes, bytes]:
    """Put a software key in the token; return it and its secret bytes to look for."""
    target = TARGET_TYPES[type_name]
    if target.family == "oct":
        raw = generate_target(type_name).plaintext.reveal()
        import_aes(session, raw, label)
        return raw, raw
    key: PrivateKeyTypes
    if target.family == "RSA":
        assert target.key_size is not None
        key = rsa.generate_private_key(65537, target.key_size)
        import_rsa(session, key, label)
        secret = key.private_numbers().d.to_bytes(target.key_size // 8, "big")
    else:
        assert target.crv is not None
        key = ec.generate_private_key(target.curve())
        import_ec(session, key, EC_PARAMS_BY_CRV[target.crv], label)
        secret = key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8, "big")
    return key, secret


@pytest.mark.parametrize("type_name", ["rsa-2048", "ec-p384", "ec-p256k", "oct-192"])
def test_existing_key_found_by_label_is_wrapped_exactly(
    type_name: str,
    softhsm: SoftHsm,
    kek: KekFiles,
    pin_env: str,
    label: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = TARGET_TYPES[type_name]
    with softhsm.session() as session:
        original, secret = _import_known(session, type_name, label)
    out = tmp_path / "existing.byok"
    manifest, ciphertext, stdout, stderr = _run_wrap(
        softhsm, kek, out, capsys, "--key-label", label, "--json"
    )
    assert json.loads(stdout)["fingerprint"] == manifest["target"]["fingerprint"]
    plaintext = unwrap_target(kek.private_key, ciphertext)
    if isinstance(original, bytes):
        assert plaintext.reveal() == original
        assert manifest["target"]["fingerprint"]["value"] == key_check_value(SecretBytes(original))
    else:
        unwrapped = _check_private_key(plaintext, target, manifest)
        assert isinstance(unwrapped, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
        assert isinstance(original, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
        assert unwrapped.private_numbers() == original.private_numbers()

    outputs = {
        "package": out.read_bytes(),
        "manifest": out.with_name("existing.manifest.json").read_bytes(),
        "stdout": stdout.encode(),
        "stderr": stderr.encode(),
    }
    assert leaked_forms(secret, outputs) == []
    assert leaked_forms(plaintext.reveal(), outputs) == []


def test_plaintext_never_in_output_files_of_the_process(
    softhsm: SoftHsm, kek: KekFiles, label: str, tmp_path: Path
) -> None:
    """A real process: the token-generated key's plaintext (learnt only by unwrapping the package
    here) and the transport AES key appear in no output, in raw, hex or base64 form."""
    out = tmp_path / "leak-check.byok"
    argv = [*wrap_args(softhsm, kek, out, "--generate", "rsa-2048", "--key-label", label)]
    proc = subprocess.run(
        [sys.executable, "-m", "offline_packager", *argv, "--json"],
        capture_output=True,
        env=softhsm.env(),
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    package = json.loads(out.read_bytes())
    ciphertext = b64url_decode(package["ciphertext"])
    plaintext = unwrap_target(kek.private_key, ciphertext)
    der = strip_zero_padding(plaintext).reveal()
    key = serialization.load_der_private_key(der, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    numbers = key.private_numbers()
    transport_key = kek.private_key.decrypt(ciphertext[:256], oaep_sha1())
    secrets = {
        "pkcs8": der,
        "d": numbers.d.to_bytes(256, "big"),
        "p": numbers.p.to_bytes(128, "big"),
        "q": numbers.q.to_bytes(128, "big"),
        "transport AES key": transport_key,
    }
    outputs = {
        "package": out.read_bytes(),
        "manifest": out.with_name("leak-check.manifest.json").read_bytes(),
        "stdout": proc.stdout,
        "stderr": proc.stderr,
    }
    assert {name: leaked_forms(s, outputs) for name, s in secrets.items()} == {
        name: [] for name in secrets
    }
    # The scan itself finds a planted secret in each form it looks for.
    import base64

    planted = {"hex": b"x" + numbers.p.to_bytes(128, "big").hex().encode() + b"y"}
    planted["b64"] = b"{" + base64.b64encode(secrets["d"][1:]) + b"}"
    assert leaked_forms(secrets["p"], planted) == ["hex in hex"]
    assert leaked_forms(secrets["d"], planted) == ["b64+1 in b64"]


@pytest.mark.parametrize(
    ("type_name", "padded"),
    [("ec-p256", True), ("ec-p384", False), ("rsa-2048", None), ("oct-128", False)],
)
def test_softhsm_zero_padding_shown_and_reported(
    type_name: str,
    padded: bool | None,
    softhsm: SoftHsm,
    kek: KekFiles,
    label: str,
) -> None:
    """SoftHSM pads RSA/EC PKCS#8 with zeros to a multiple of 8 before KWP: strict DER parsing
    of the unwrapped plaintext fails when it did, the reader must strip 1-7 zeros, and the
    result carries the warning for every RSA/EC key from SoftHSM (never for AES)."""
    request = TokenRequest(
        module=softhsm.module,
        token_label=softhsm.token_label,
        pin=softhsm.pin.encode,
        key_label=label,
        generate=type_name,
    )
    result = wrap_in_token(request, kek=check_kek(kek.private_key.public_key()))
    plaintext = unwrap_target(kek.private_key, result.ciphertext)
    if type_name.startswith("oct"):
        assert result.warnings == ()
        assert len(plaintext) == 16
        assert key_check_value(plaintext) == result.target.fingerprint.value
        return
    assert result.warnings == (SOFTHSM_PADDING_WARNING,)
    der = strip_zero_padding(plaintext).reveal()
    pad = len(plaintext) - len(der)
    assert pad == (-len(der)) % 8
    assert plaintext.reveal() == der + bytes(pad)
    if padded is not None:  # EC lengths are fixed per curve (67 bytes for P-256, 80 for P-384)
        assert (pad > 0) is padded
    if pad:
        with pytest.raises(ValueError, match=r"(?i)extra|trailing|parse|deserialize"):
            serialization.load_der_private_key(plaintext.reveal(), password=None)
    key = serialization.load_der_private_key(der, password=None)
    assert spki_sha256(key.public_key()) == result.target.fingerprint.value


def test_two_step_wrap_destroys_its_session_objects(softhsm: SoftHsm, kek: KekFiles) -> None:
    from pkcs11 import Attribute, KeyType, ObjectClass

    raw = bytes(range(32))
    with softhsm.session() as session:
        target = session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.TOKEN: False,
                Attribute.EXTRACTABLE: True,
                Attribute.VALUE: raw,
            }
        )
        import pkcs11

        ciphertext = _wrap_two_step(
            pkcs11, session, check_kek(kek.private_key.public_key()), target
        )
        left = list(session.get_objects({Attribute.TOKEN: False}))
        assert left == [target]
    assert unwrap_target(kek.private_key, ciphertext).reveal() == raw


@pytest.mark.parametrize("failure", ["target not extractable", "mechanism refused"])
def test_two_step_wrap_destroys_its_session_objects_when_the_kwp_wrap_fails(
    failure: str, softhsm: SoftHsm, kek: KekFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The KWP step fails after the session AES key and the session KEK exist: both go."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass

    import offline_packager.pkcs11_source as source

    if failure == "mechanism refused":  # a vendor-defined number SoftHSM does not know
        monkeypatch.setattr(source, "CKM_AES_KEY_WRAP_PAD", 0x8000_7A7A)
    with softhsm.session() as session:
        persistent = len(list(session.get_objects({Attribute.TOKEN: True})))
        target = session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.TOKEN: False,
                Attribute.EXTRACTABLE: failure != "target not extractable",
                Attribute.VALUE: bytes(range(32)),
            }
        )
        destroyed: list[str] = []
        real_destroy = source._destroy_quietly

        def destroy_quietly(p11: Any, objects: list[Any]) -> None:
            destroyed.extend(str(o[Attribute.LABEL]) for o in objects)
            real_destroy(p11, objects)

        monkeypatch.setattr(source, "_destroy_quietly", destroy_quietly)
        # Raised by the KWP step: the OAEP step wraps an extractable AES key with a standard
        # mechanism, so neither error can come from it.
        expected = (
            pkcs11.KeyUnextractable
            if failure == "target not extractable"
            else pkcs11.MechanismInvalid
        )
        with pytest.raises(expected):
            _wrap_two_step(pkcs11, session, check_kek(kek.private_key.public_key()), target)
        # Both session objects existed when the KWP step failed, and both were destroyed.
        assert sorted(destroyed) == ["byok KEK (session)", "byok transport key (session)"]
        assert list(session.get_objects({Attribute.TOKEN: False})) == [target]
        assert len(list(session.get_objects({Attribute.TOKEN: True}))) == persistent


def test_key_generated_for_a_failed_wrap_is_destroyed(
    softhsm: SoftHsm, kek: KekFiles, label: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry may reuse the label: a key generated by a call whose wrap failed is removed."""
    import offline_packager.pkcs11_source as source
    from offline_packager.errors import Pkcs11Error

    def failing_wrap(*args: object) -> tuple[bytes, str]:
        raise Pkcs11Error("simulated token failure")

    monkeypatch.setattr(source, "_wrap", failing_wrap)
    request = TokenRequest(
        module=softhsm.module,
        token_label=softhsm.token_label,
        pin=softhsm.pin.encode,
        key_label=label,
        generate="ec-p256",
    )
    with pytest.raises(Pkcs11Error, match="simulated"):
        wrap_in_token(request, kek=check_kek(kek.private_key.public_key()))
    from pkcs11 import Attribute

    with softhsm.session() as session:
        assert list(session.get_objects({Attribute.LABEL: label})) == []
