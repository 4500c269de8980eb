"""The CKM_RSA_AES_KEY_WRAP path, which SoftHSM2 lacks, against a fake token object: the
mechanism number, the CK_RSA_AES_KEY_WRAP_PARAMS bytes and the session KEK's cleanup."""

from __future__ import annotations

import ctypes
from typing import Any, cast

import pkcs11
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11.types import Key, WrapMixin

from offline_packager.errors import Pkcs11Error
from offline_packager.kek import Kek, check_kek
from offline_packager.pkcs11_source import (
    CKM_AES_KEY_WRAP_PAD,
    CKM_RSA_AES_KEY_WRAP,
    MECHANISM_SINGLE,
    _RsaAesKeyWrapParams,
    _wrap,
)
from offline_packager.secret import SecretBytes
from offline_packager.wrap import unwrap_target, wrap_target

TARGET = bytes(range(24))


class FakeTarget(Key):
    def __init__(self) -> None:
        pass


class FakeKekObject(WrapMixin):
    """Checks what the token would receive, then wraps like a CKM_RSA_AES_KEY_WRAP token."""

    def __init__(self, session: FakeSession, template: dict[Any, Any]) -> None:
        self.fake_session = session
        self.template = template
        self.seen: dict[str, Any] = {}
        self.destroyed = False

    def wrap_key(self, key: Any, mechanism: Any = None, mechanism_param: Any = None) -> bytes:
        assert isinstance(key, FakeTarget)
        assert isinstance(mechanism, pkcs11.Mechanism)
        params = _RsaAesKeyWrapParams.from_buffer_copy(mechanism_param)
        oaep = params.pOAEPParams.contents  # dereferenced while the caller keeps it alive
        self.seen = {
            "mechanism": int(mechanism),
            "aes_bits": params.ulAESKeyBits,
            "oaep": (oaep.hashAlg, oaep.mgf, oaep.source, oaep.pSourceData, oaep.ulSourceDataLen),
            "param_size": len(mechanism_param),
        }
        kek = self.fake_session.kek.public_key
        return wrap_target(kek, SecretBytes(TARGET))

    def destroy(self) -> None:
        self.destroyed = True


class FakeSession:
    def __init__(self, kek: Kek) -> None:
        self.kek = kek
        self.created: list[FakeKekObject] = []

    def create_object(self, template: dict[Any, Any]) -> FakeKekObject:
        obj = FakeKekObject(self, template)
        self.created.append(obj)
        return obj


@pytest.fixture(scope="module")
def kek_pair() -> tuple[rsa.RSAPrivateKey, Kek]:
    private = rsa.generate_private_key(65537, 2048)
    return private, check_kek(private.public_key())


def test_single_step_used_when_listed(kek_pair: tuple[rsa.RSAPrivateKey, Kek]) -> None:
    private, kek = kek_pair
    session = FakeSession(kek)
    ciphertext, mechanism = _wrap(
        pkcs11,
        cast(Any, session),
        kek,
        FakeTarget(),
        {CKM_RSA_AES_KEY_WRAP, CKM_AES_KEY_WRAP_PAD},
    )
    assert mechanism == MECHANISM_SINGLE
    assert unwrap_target(private, ciphertext).reveal() == TARGET
    (kek_object,) = session.created
    assert kek_object.seen == {
        "mechanism": 0x1054,
        "aes_bits": 256,
        "oaep": (0x220, 0x1, 0x1, None, 0),  # CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED
        "param_size": ctypes.sizeof(_RsaAesKeyWrapParams),
    }
    assert kek_object.destroyed
    template = {int(k): v for k, v in kek_object.template.items()}
    assert template[int(pkcs11.Attribute.TOKEN)] is False
    assert template[int(pkcs11.Attribute.WRAP)] is True
    assert template[int(pkcs11.Attribute.MODULUS)] == kek.public_key.public_numbers().n.to_bytes(
        256, "big"
    )


def test_no_usable_mechanism_is_refused(kek_pair: tuple[rsa.RSAPrivateKey, Kek]) -> None:
    _, kek = kek_pair
    session = FakeSession(kek)
    with pytest.raises(Pkcs11Error) as info:
        _wrap(pkcs11, cast(Any, session), kek, FakeTarget(), {0x1081, 0x2109})
    assert info.value.reason == "mechanism_unsupported"
    assert session.created == []
