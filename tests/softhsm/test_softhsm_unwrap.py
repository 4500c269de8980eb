"""Packages from the software path unwrap *inside* SoftHSM2 (an independent KWP/OAEP
implementation), two-step: CKM_RSA_PKCS_OAEP with the KEK private key imported into the token,
then CKM_AES_KEY_WRAP_PAD into a key object whose public part / zero-block encryption matches."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from softhsm_helpers import KekFiles, SoftHsm

from offline_packager.keytypes import TARGET_TYPES
from offline_packager.pkcs11_source import EC_PARAMS_BY_CRV
from offline_packager.target_keys import TargetKey, generate_target
from offline_packager.wrap import split_ciphertext, wrap_target

pytestmark = pytest.mark.softhsm

MESSAGE = b"byok: the key inside the token is the key that was packaged"


def _session_kek_private(session: Any, kek: rsa.RSAPrivateKey) -> Any:
    from pkcs11 import Attribute, KeyType, ObjectClass

    numbers = kek.private_numbers()

    def be(value: int) -> bytes:
        return value.to_bytes((value.bit_length() + 7) // 8, "big")

    return session.create_object(
        {
            Attribute.CLASS: ObjectClass.PRIVATE_KEY,
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.TOKEN: False,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.UNWRAP: True,
            Attribute.MODULUS: be(numbers.public_numbers.n),
            Attribute.PUBLIC_EXPONENT: be(numbers.public_numbers.e),
            Attribute.PRIVATE_EXPONENT: be(numbers.d),
            Attribute.PRIME_1: be(numbers.p),
            Attribute.PRIME_2: be(numbers.q),
            Attribute.EXPONENT_1: be(numbers.dmp1),
            Attribute.EXPONENT_2: be(numbers.dmq1),
            Attribute.COEFFICIENT: be(numbers.iqmp),
        }
    )


def _unwrap_in_token(
    session: Any, kek: rsa.RSAPrivateKey, key: TargetKey, ciphertext: bytes
) -> Any:
    """The two-step unwrap inside the token; returns the unwrapped target key object."""
    from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
    from pkcs11.constants import DEFAULT

    rsa_block, kwp = split_ciphertext(ciphertext, kek.key_size // 8)
    kek_object = _session_kek_private(session, kek)
    aes_key = kek_object.unwrap_key(
        ObjectClass.SECRET_KEY,
        KeyType.AES,
        rsa_block,
        mechanism=Mechanism.RSA_PKCS_OAEP,
        mechanism_param=(Mechanism.SHA_1, MGF.SHA1, None),
        capabilities=MechanismFlag.UNWRAP,
        template={Attribute.TOKEN: False},
    )
    family = key.type.family
    object_class = ObjectClass.SECRET_KEY if family == "oct" else ObjectClass.PRIVATE_KEY
    key_type = {"oct": KeyType.AES, "RSA": KeyType.RSA, "EC": KeyType.EC}[family]
    capabilities = MechanismFlag.ENCRYPT if family == "oct" else MechanismFlag.SIGN
    template: dict[Any, Any] = {Attribute.TOKEN: False}
    if family != "oct":
        # python-pkcs11 adds every capability attribute; private keys have no ENCRYPT/VERIFY/WRAP.
        template.update(
            dict.fromkeys((Attribute.ENCRYPT, Attribute.VERIFY, Attribute.WRAP), DEFAULT)
        )
    return aes_key.unwrap_key(
        object_class,
        key_type,
        kwp,
        mechanism=Mechanism.AES_KEY_WRAP_PAD,
        capabilities=capabilities,
        template=template,
    )


@pytest.mark.parametrize(
    "type_name",
    [
        "rsa-2048",
        "rsa-3072",
        "rsa-4096",
        "ec-p256",
        "ec-p384",
        "ec-p521",
        "ec-p256k",
        "oct-128",
        "oct-192",
        "oct-256",
    ],
)
def test_software_package_unwraps_inside_softhsm(
    type_name: str, softhsm: SoftHsm, kek: KekFiles
) -> None:
    from pkcs11 import Attribute, Mechanism

    key = generate_target(type_name)
    ciphertext = wrap_target(kek.private_key.public_key(), key.plaintext)
    with softhsm.session() as session:
        unwrapped = _unwrap_in_token(session, kek.private_key, key, ciphertext)
        public = key.public_key
        if isinstance(public, rsa.RSAPublicKey):
            n = public.public_numbers().n
            assert unwrapped[Attribute.MODULUS] == n.to_bytes(public.key_size // 8, "big")
            signature = unwrapped.sign(MESSAGE, mechanism=Mechanism.SHA256_RSA_PKCS)
            public.verify(signature, MESSAGE, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public, ec.EllipticCurvePublicKey):
            crv = TARGET_TYPES[type_name].crv
            assert crv is not None
            assert unwrapped[Attribute.EC_PARAMS] == EC_PARAMS_BY_CRV[crv]
            digest = hashes.Hash(hashes.SHA256())
            digest.update(MESSAGE)
            raw = unwrapped.sign(digest.finalize(), mechanism=Mechanism.ECDSA)
            half = len(raw) // 2
            der = utils.encode_dss_signature(
                int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
            )
            public.verify(der, MESSAGE, ec.ECDSA(hashes.SHA256()))
        else:
            in_token = unwrapped.encrypt(bytes(16), mechanism=Mechanism.AES_ECB)
            cipher = Cipher(algorithms.AES(key.plaintext.reveal()), modes.ECB())  # noqa: S305  # one block: the KCV definition
            encryptor = cipher.encryptor()
            assert in_token == encryptor.update(bytes(16)) + encryptor.finalize()
            assert in_token[:3].hex().upper() == key.fingerprint.value


@pytest.mark.parametrize("where", ["rsa block", "kwp block"])
def test_tampered_software_package_is_refused_by_softhsm(
    where: str, softhsm: SoftHsm, kek: KekFiles
) -> None:
    import pkcs11

    key = generate_target("oct-256")
    ciphertext = bytearray(wrap_target(kek.private_key.public_key(), key.plaintext))
    ciphertext[10 if where == "rsa block" else -3] ^= 0x01
    with softhsm.session() as session, pytest.raises(pkcs11.PKCS11Error):
        _unwrap_in_token(session, kek.private_key, key, bytes(ciphertext))
