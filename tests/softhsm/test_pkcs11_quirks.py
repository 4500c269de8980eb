"""The reader-side handling of SoftHSM's zero padding accepts exactly 1-7 zero bytes after a
complete DER SEQUENCE and nothing else."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization

from offline_packager.errors import WrapError
from offline_packager.pkcs11_quirks import (
    der_sequence_length,
    pads_private_keys_with_zeros,
    strip_zero_padding,
    zero_padding_length,
)
from offline_packager.secret import SecretBytes
from offline_packager.target_keys import generate_target


@pytest.fixture(scope="module")
def der() -> bytes:
    return generate_target("ec-p256").plaintext.reveal()


@pytest.mark.parametrize("pad", range(8))
def test_zero_padding_is_stripped(der: bytes, pad: int) -> None:
    padded = SecretBytes(der + bytes(pad))
    assert zero_padding_length(padded) == pad
    assert strip_zero_padding(padded).reveal() == der
    serialization.load_der_private_key(strip_zero_padding(padded).reveal(), password=None)


@pytest.mark.parametrize(
    ("suffix", "reason"),
    [
        (bytes(8), "bad_padding"),
        (b"\x00\x01", "bad_padding"),
        (b"\x80", "bad_padding"),
    ],
    ids=["eight zeros", "non-zero byte", "one non-zero"],
)
def test_anything_else_after_the_der_is_refused(der: bytes, suffix: bytes, reason: str) -> None:
    with pytest.raises(WrapError) as info:
        strip_zero_padding(SecretBytes(der + suffix))
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "data",
    [b"", b"\x30", b"\x04\x02ab", b"\x30\x05abc", b"\x30\x80\x00\x00", b"\x30\x82\x01"],
    ids=["empty", "no length", "not a SEQUENCE", "truncated", "indefinite", "short length"],
)
def test_malformed_der_is_refused(data: bytes) -> None:
    with pytest.raises(WrapError) as info:
        der_sequence_length(data)
    assert info.value.reason == "bad_plaintext"


def test_long_form_length(der: bytes) -> None:
    rsa_der = generate_target("rsa-2048").plaintext.reveal()
    assert rsa_der[1] == 0x82
    assert der_sequence_length(rsa_der + bytes(3)) == len(rsa_der)
    assert der_sequence_length(der) == len(der)


def test_softhsm_detection() -> None:
    assert pads_private_keys_with_zeros("SoftHSM project", "SoftHSM v2")
    assert pads_private_keys_with_zeros("", "SoftHSM v2 ")
    assert not pads_private_keys_with_zeros("Thales", "Luna K7")
