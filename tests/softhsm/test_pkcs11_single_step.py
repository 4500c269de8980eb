"""The CKM_RSA_AES_KEY_WRAP path, which SoftHSM2 lacks, against a fake token object: the
mechanism number, the CK_RSA_AES_KEY_WRAP_PARAMS bytes, the session KEK's cleanup, the CKF_WRAP
check and the fallback to the two-step form when the token refuses the mechanism."""

from __future__ import annotations

import ctypes
import os
from typing import Any, cast

import pkcs11
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
from pkcs11.types import Key, WrapMixin

from offline_packager.errors import Pkcs11Error
from offline_packager.kek import Kek, check_kek
from offline_packager.pkcs11_source import (
    CKM_AES_KEY_WRAP_PAD,
    CKM_RSA_AES_KEY_WRAP,
    MECHANISM_SINGLE,
    MECHANISM_TWO_STEP,
    _RsaAesKeyWrapParams,
    _wrap,
    _wrap_mechanisms,
)
from offline_packager.secret import SecretBytes
from offline_packager.wrap import oaep_sha1, unwrap_target, wrap_target

TARGET = bytes(range(24))
WRAP = int(pkcs11.MechanismFlag.WRAP)
UNWRAP = int(pkcs11.MechanismFlag.UNWRAP)
BOTH = {CKM_RSA_AES_KEY_WRAP: WRAP | UNWRAP, CKM_AES_KEY_WRAP_PAD: WRAP | UNWRAP}


class FakeTarget(Key):
    def __init__(self) -> None:
        pass


class FakeAesKey(WrapMixin):
    """The two-step form's session AES key: RFC 5649 over the target."""

    def __init__(self, session: FakeSession, template: dict[Any, Any]) -> None:
        self.fake_session = session
        self.template = template
        self.raw = os.urandom(32)
        self.destroyed = False

    def wrap_key(self, key: Any, mechanism: Any = None, mechanism_param: Any = None) -> bytes:
        assert isinstance(key, FakeTarget)
        assert int(mechanism) == CKM_AES_KEY_WRAP_PAD
        assert mechanism_param is None
        self.fake_session.attempts.append(int(mechanism))
        return aes_key_wrap_with_padding(self.raw, TARGET)

    def destroy(self) -> None:
        self.destroyed = True


class FakeKekObject(WrapMixin):
    """Checks what the token would receive, then wraps like a CKM_RSA_AES_KEY_WRAP token (or
    refuses it with the session's ``refuse`` exception); RSA-OAEP for the two-step form."""

    def __init__(self, session: FakeSession, template: dict[Any, Any]) -> None:
        self.fake_session = session
        self.template = template
        self.seen: dict[str, Any] = {}
        self.destroyed = False

    def wrap_key(self, key: Any, mechanism: Any = None, mechanism_param: Any = None) -> bytes:
        assert isinstance(mechanism, pkcs11.Mechanism)
        kek = self.fake_session.kek.public_key
        if mechanism == pkcs11.Mechanism.RSA_PKCS_OAEP:
            assert isinstance(key, FakeAesKey)
            assert mechanism_param == (pkcs11.Mechanism.SHA_1, pkcs11.MGF.SHA1, None)
            self.seen = {"mechanism": int(mechanism)}
            return kek.encrypt(key.raw, oaep_sha1())
        assert isinstance(key, FakeTarget)
        self.fake_session.attempts.append(int(mechanism))
        if self.fake_session.refuse is not None:
            raise self.fake_session.refuse()
        params = _RsaAesKeyWrapParams.from_buffer_copy(mechanism_param)
        oaep = params.pOAEPParams.contents  # dereferenced while the caller keeps it alive
        self.seen = {
            "mechanism": int(mechanism),
            "aes_bits": params.ulAESKeyBits,
            "oaep": (oaep.hashAlg, oaep.mgf, oaep.source, oaep.pSourceData, oaep.ulSourceDataLen),
            "param_size": len(mechanism_param),
        }
        return wrap_target(kek, SecretBytes(TARGET))

    def destroy(self) -> None:
        self.destroyed = True


class FakeSession:
    def __init__(self, kek: Kek, refuse: type[Exception] | None = None) -> None:
        self.kek = kek
        self.refuse = refuse
        self.attempts: list[int] = []  # mechanisms tried on the target, in order
        self.created: list[FakeKekObject | FakeAesKey] = []

    def create_object(self, template: dict[Any, Any]) -> FakeKekObject:
        obj = FakeKekObject(self, template)
        self.created.append(obj)
        return obj

    def generate_key(self, key_type: Any, key_length: int, **kwargs: Any) -> FakeAesKey:
        assert key_type == pkcs11.KeyType.AES
        assert key_length == 256
        assert kwargs["store"] is False
        key = FakeAesKey(self, kwargs["template"])
        self.created.append(key)
        return key


class FakeMechanismInfo:
    def __init__(self, flags: int) -> None:
        self.flags = pkcs11.MechanismFlag(flags)


class FakeSlot:
    """Lists mechanisms with flags; ``None`` flags: C_GetMechanismInfo fails for it."""

    def __init__(self, flags: dict[int, int | None]) -> None:
        self.flags = flags

    def get_mechanisms(self) -> set[int]:
        return set(self.flags)

    def get_mechanism_info(self, mechanism: int) -> FakeMechanismInfo:
        flags = self.flags[mechanism]
        if flags is None:
            raise pkcs11.FunctionFailed
        return FakeMechanismInfo(flags)


@pytest.fixture(scope="module")
def kek_pair() -> tuple[rsa.RSAPrivateKey, Kek]:
    private = rsa.generate_private_key(65537, 2048)
    return private, check_kek(private.public_key())


def test_single_step_used_when_listed(kek_pair: tuple[rsa.RSAPrivateKey, Kek]) -> None:
    private, kek = kek_pair
    session = FakeSession(kek)
    ciphertext, mechanism = _wrap(pkcs11, cast(Any, session), kek, FakeTarget(), BOTH)
    assert mechanism == MECHANISM_SINGLE
    assert unwrap_target(private, ciphertext).reveal() == TARGET
    (kek_object,) = session.created
    assert isinstance(kek_object, FakeKekObject)
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
        _wrap(pkcs11, cast(Any, session), kek, FakeTarget(), {0x1081: WRAP, 0x2109: WRAP})
    assert info.value.reason == "mechanism_unsupported"
    assert session.created == []


def _assert_two_step(
    session: FakeSession, private: rsa.RSAPrivateKey, ciphertext: bytes, mechanism: str
) -> None:
    assert mechanism == MECHANISM_TWO_STEP
    assert unwrap_target(private, ciphertext).reveal() == TARGET
    assert session.created  # the two-step form's session objects, all destroyed again
    assert all(obj.destroyed for obj in session.created)


def test_single_step_listed_without_ckf_wrap_is_not_used(
    kek_pair: tuple[rsa.RSAPrivateKey, Kek],
) -> None:
    """A token may list CKM_RSA_AES_KEY_WRAP for unwrapping only: the two-step form is used."""
    private, kek = kek_pair
    session = FakeSession(kek)
    mechanisms = {CKM_RSA_AES_KEY_WRAP: UNWRAP, CKM_AES_KEY_WRAP_PAD: WRAP | UNWRAP}
    ciphertext, mechanism = _wrap(pkcs11, cast(Any, session), kek, FakeTarget(), mechanisms)
    assert session.attempts == [CKM_AES_KEY_WRAP_PAD]  # CKM_RSA_AES_KEY_WRAP never tried
    _assert_two_step(session, private, ciphertext, mechanism)


@pytest.mark.parametrize("refusal", [pkcs11.MechanismInvalid, pkcs11.MechanismParamInvalid])
def test_refused_single_step_falls_back_to_two_step(
    refusal: type[Exception], kek_pair: tuple[rsa.RSAPrivateKey, Kek]
) -> None:
    """CKR_MECHANISM_INVALID or CKR_MECHANISM_PARAM_INVALID from C_WrapKey: two-step form."""
    private, kek = kek_pair
    session = FakeSession(kek, refuse=refusal)
    ciphertext, mechanism = _wrap(pkcs11, cast(Any, session), kek, FakeTarget(), BOTH)
    # The single step was tried first; its session KEK is destroyed like the two-step objects.
    assert session.attempts == [CKM_RSA_AES_KEY_WRAP, CKM_AES_KEY_WRAP_PAD]
    assert len(session.created) == 3
    _assert_two_step(session, private, ciphertext, mechanism)


def test_refused_single_step_without_kwp_is_refused(
    kek_pair: tuple[rsa.RSAPrivateKey, Kek],
) -> None:
    _, kek = kek_pair
    session = FakeSession(kek, refuse=pkcs11.MechanismParamInvalid)
    with pytest.raises(Pkcs11Error) as info:
        _wrap(pkcs11, cast(Any, session), kek, FakeTarget(), {CKM_RSA_AES_KEY_WRAP: WRAP})
    assert info.value.reason == "mechanism_unsupported"
    assert "MechanismParamInvalid" in str(info.value)
    (kek_object,) = session.created
    assert kek_object.destroyed


@pytest.mark.parametrize(
    "refusal", [pkcs11.KeyUnextractable, pkcs11.FunctionFailed, pkcs11.DeviceError]
)
def test_other_single_step_failures_do_not_fall_back(
    refusal: type[Exception], kek_pair: tuple[rsa.RSAPrivateKey, Kek]
) -> None:
    """Only a refused mechanism or parameter is a reason to try the other form."""
    _, kek = kek_pair
    session = FakeSession(kek, refuse=refusal)
    with pytest.raises(refusal):
        _wrap(pkcs11, cast(Any, session), kek, FakeTarget(), BOTH)
    assert session.attempts == [CKM_RSA_AES_KEY_WRAP]
    assert all(obj.destroyed for obj in session.created)


def test_wrap_mechanisms_reads_the_flags() -> None:
    slot = FakeSlot(
        {
            CKM_RSA_AES_KEY_WRAP: WRAP | UNWRAP,
            CKM_AES_KEY_WRAP_PAD: None,  # listed, but its info cannot be read
            int(pkcs11.Mechanism.AES_ECB): 0x300,
        }
    )
    assert _wrap_mechanisms(pkcs11, slot) == {
        CKM_RSA_AES_KEY_WRAP: WRAP | UNWRAP,
        CKM_AES_KEY_WRAP_PAD: 0,
    }
    assert _wrap_mechanisms(pkcs11, FakeSlot({int(pkcs11.Mechanism.AES_ECB): 0x300})) == {}
