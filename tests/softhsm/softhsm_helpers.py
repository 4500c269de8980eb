"""Helpers for the SoftHSM2 tests (a uniquely named module: tests are not a package)."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from offline_packager.kek import spki_sha256

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN_LABEL = "byok-test"
USER_PIN = "4711-user"
SO_PIN = "0815-so"
PIN_ENV = "BYOK_TEST_TOKEN_PIN"
KEK_KID = "https://contoso.managedhsm.azure.net/keys/KEKforBYOK/0123456789abcdef0123456789abcdef"


@dataclass(frozen=True)
class SoftHsm:
    """A freshly initialised SoftHSM2 token."""

    module: str
    token_label: str
    pin: str
    conf: Path

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that must see this token."""
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf), PIN_ENV: self.pin}

    @contextmanager
    def session(self) -> Iterator[Any]:
        """A logged-in R/W session for test set-up and checks; closed before the code under test
        runs, because a second C_Login in the same process would fail."""
        import pkcs11

        token = pkcs11.lib(self.module).get_token(token_label=self.token_label)
        with token.open(rw=True, user_pin=self.pin) as session:
            yield session


@dataclass(frozen=True)
class KekFiles:
    private_key: rsa.RSAPrivateKey
    pem: Path


def wrap_args(softhsm: SoftHsm, kek: KekFiles, out: Path, *extra: str) -> list[str]:
    """``byok-package wrap`` arguments for HSM mode (add --generate/--key-label in ``extra``)."""
    return [
        "wrap",
        "--kek",
        str(kek.pem),
        "--kek-kid",
        KEK_KID,
        "--kek-sha256",  # as a custodian does: the fingerprint read out on the connected side
        spki_sha256(kek.private_key.public_key()),
        "--pkcs11-module",
        softhsm.module,
        "--token-label",
        softhsm.token_label,
        "--pin-env",
        PIN_ENV,
        "--out",
        str(out),
        *extra,
    ]


def secret_forms(secret: bytes) -> list[bytes]:
    """Encodings under which a secret could leak into a text or binary output."""
    forms = [secret, secret.hex().encode(), secret.hex().upper().encode()]
    # At each of the 3 alignments; the last group is dropped as it depends on what follows.
    forms.extend(
        encode(secret[shift:]).rstrip(b"=")[:-4]
        for shift in range(3)
        for encode in (base64.b64encode, base64.urlsafe_b64encode)
    )
    return forms


def leaked_forms(secret: bytes, blobs: dict[str, bytes]) -> list[str]:
    """Which outputs contain which encoding of ``secret`` (empty when nothing leaked)."""
    names = ["raw", "hex", "HEX", "b64", "b64url", "b64+1", "b64url+1", "b64+2", "b64url+2"]
    return [
        f"{name} in {where}"
        for where, blob in blobs.items()
        for name, form in zip(names, secret_forms(secret), strict=True)
        if form in blob
    ]


def ec_point_der(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """CKA_EC_POINT: the uncompressed point as a DER OCTET STRING."""
    point = public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    length = bytes([len(point)]) if len(point) < 0x80 else bytes([0x81, len(point)])
    return b"\x04" + length + point


def _be(value: int, length: int | None = None) -> bytes:
    return value.to_bytes(length or max(1, (value.bit_length() + 7) // 8), "big")


def import_rsa(
    session: Any, key: rsa.RSAPrivateKey, label: str, extra: dict[Any, Any] | None = None
) -> None:
    """Store a software RSA key in the token as a persistent, sensitive, extractable key."""
    from pkcs11 import Attribute, KeyType, ObjectClass

    priv = key.private_numbers()
    pub = priv.public_numbers
    attrs: dict[Any, Any] = {
        Attribute.CLASS: ObjectClass.PRIVATE_KEY,
        Attribute.KEY_TYPE: KeyType.RSA,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: True,
        Attribute.SIGN: True,
        Attribute.LABEL: label,
        Attribute.ID: label.encode(),
        Attribute.MODULUS: _be(pub.n),
        Attribute.PUBLIC_EXPONENT: _be(pub.e),
        Attribute.PRIVATE_EXPONENT: _be(priv.d),
        Attribute.PRIME_1: _be(priv.p),
        Attribute.PRIME_2: _be(priv.q),
        Attribute.EXPONENT_1: _be(priv.dmp1),
        Attribute.EXPONENT_2: _be(priv.dmq1),
        Attribute.COEFFICIENT: _be(priv.iqmp),
    }
    session.create_object({**attrs, **(extra or {})})


def import_ec(
    session: Any,
    key: ec.EllipticCurvePrivateKey,
    ec_params: bytes,
    label: str,
    *,
    with_public: bool = True,
) -> None:
    """Store a software EC key pair in the token (private + public object, same label and ID;
    the private object alone when not ``with_public``)."""
    from pkcs11 import Attribute, KeyType, ObjectClass

    common = {
        Attribute.KEY_TYPE: KeyType.EC,
        Attribute.TOKEN: True,
        Attribute.LABEL: label,
        Attribute.ID: label.encode(),
        Attribute.EC_PARAMS: ec_params,
    }
    size = (key.curve.key_size + 7) // 8
    session.create_object(
        {
            **common,
            Attribute.CLASS: ObjectClass.PRIVATE_KEY,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: True,
            Attribute.SIGN: True,
            Attribute.VALUE: _be(key.private_numbers().private_value, size),
        }
    )
    if not with_public:
        return
    session.create_object(
        {
            **common,
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.VERIFY: True,
            Attribute.EC_POINT: ec_point_der(key.public_key()),
        }
    )


def import_public(
    session: Any,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    label: str,
    key_id: bytes,
    ec_params: bytes | None = None,
) -> None:
    """Store a lone public key object (e.g. one that shares a label with another key)."""
    from pkcs11 import Attribute, KeyType, ObjectClass

    attrs: dict[Any, Any] = {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.TOKEN: True,
        Attribute.VERIFY: True,
        Attribute.LABEL: label,
        Attribute.ID: key_id,
    }
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        attrs[Attribute.KEY_TYPE] = KeyType.RSA
        attrs[Attribute.MODULUS] = _be(numbers.n)
        attrs[Attribute.PUBLIC_EXPONENT] = _be(numbers.e)
    else:
        assert ec_params is not None
        attrs[Attribute.KEY_TYPE] = KeyType.EC
        attrs[Attribute.EC_PARAMS] = ec_params
        attrs[Attribute.EC_POINT] = ec_point_der(public_key)
    session.create_object(attrs)


def import_aes(session: Any, raw: bytes, label: str, extra: dict[Any, Any] | None = None) -> None:
    """Store raw AES key bytes in the token as a persistent, sensitive, extractable key."""
    from pkcs11 import Attribute, KeyType, ObjectClass

    attrs: dict[Any, Any] = {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.AES,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: True,
        Attribute.ENCRYPT: True,
        Attribute.LABEL: label,
        Attribute.VALUE: raw,
    }
    session.create_object({**attrs, **(extra or {})})


# --- approval signing keys in the token (tests/softhsm/test_approval_pkcs11.py) ----------------

ED25519_OID_PARAMS = bytes.fromhex("06032b6570")  # CKA_EC_PARAMS: OID 1.3.101.112


def generate_signing_key(session: Any, kind: str, label: str) -> Any:
    """Generate a signing key pair inside the token (label and a shared CKA_ID); return its
    public key as a ``cryptography`` object, read back from the token's public key object.

    ``kind``: ``ec-p256``, ``ec-p384``, ``ec-p521``, ``ed25519``, ``rsa-3072``, ``rsa-2048``.
    """
    from pkcs11 import Attribute, KeyType, MechanismFlag

    key_id = label.encode()
    common: dict[str, Any] = {
        "id": key_id,
        "label": label,
        "store": True,
        "capabilities": MechanismFlag.SIGN | MechanismFlag.VERIFY,
    }
    private = {Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
               Attribute.EXTRACTABLE: False}  # fmt: skip
    if kind.startswith("rsa-"):
        pub, _ = session.generate_keypair(
            KeyType.RSA, int(kind[4:]), private_template=private, **common
        )
        return rsa.RSAPublicNumbers(
            int.from_bytes(bytes(pub[Attribute.PUBLIC_EXPONENT]), "big"),
            int.from_bytes(bytes(pub[Attribute.MODULUS]), "big"),
        ).public_key()
    if kind == "ed25519":
        pub, _ = session.generate_keypair(
            KeyType.EC_EDWARDS,
            public_template={Attribute.EC_PARAMS: ED25519_OID_PARAMS},
            private_template=private,
            **common,
        )
        point = bytes(pub[Attribute.EC_POINT])
        from cryptography.hazmat.primitives.asymmetric import ed25519

        return ed25519.Ed25519PublicKey.from_public_bytes(point[-32:])
    curves = {"ec-p256": ("06082a8648ce3d030107", ec.SECP256R1()),
              "ec-p384": ("06052b81040022", ec.SECP384R1()),
              "ec-p521": ("06052b81040023", ec.SECP521R1())}  # fmt: skip
    params, curve = curves[kind]
    pub, _ = session.generate_keypair(
        KeyType.EC,
        public_template={Attribute.EC_PARAMS: bytes.fromhex(params)},
        private_template=private,
        **common,
    )
    der_point = bytes(pub[Attribute.EC_POINT])
    raw_len = 1 + 2 * ((curve.key_size + 7) // 8)
    return ec.EllipticCurvePublicKey.from_encoded_point(curve, der_point[-raw_len:])


def approve_args(
    softhsm: SoftHsm, manifest: Path, out: Path, key_label: str, approver_id: str, *extra: str
) -> list[str]:
    """``byok-package approve`` arguments for a token signer (the wrap command's token options)."""
    return [
        "approve",
        str(manifest),
        "--approver-id",
        approver_id,
        "--pkcs11-module",
        softhsm.module,
        "--token-label",
        softhsm.token_label,
        "--pin-env",
        PIN_ENV,
        "--key-label",
        key_label,
        "--out",
        str(out),
        *extra,
    ]
