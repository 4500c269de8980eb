"""Known deviations of PKCS#11 tokens from the CKM_RSA_AES_KEY_WRAP plaintext format.

Pure code (no python-pkcs11): the connected side, the emulator and tests may import it.

SoftHSM2 (2.6.1, manufacturer ``SoftHSM project``), when it wraps an RSA or EC *private* key
with ``CKM_AES_KEY_WRAP_PAD`` (or ``CKM_AES_KEY_WRAP``), first pads the PKCS#8 DER with zero
bytes to a multiple of 8 and then runs RFC 5649 over the padded bytes, so the length in the
KWP integrity check value counts the zeros: the unwrapped plaintext is the PKCS#8 DER followed
by 1-7 zero bytes whenever the DER length is not a multiple of 8. Secret (AES) keys are not
affected (16/24/32 bytes). See :mod:`offline_packager.pkcs11_source` for what the packager
does about it. :func:`strip_zero_padding` is for the tests, which accept the padding to check
the rest of the plaintext; :func:`zero_padding_length` lets a reader recognise the padding in
order to refuse it by name (the Managed HSM emulator refuses such plaintexts).
"""

from __future__ import annotations

from .errors import WrapError
from .secret import SecretBytes

SOFTHSM_MANUFACTURER = "SoftHSM project"
MAX_ZERO_PADDING = 7

SOFTHSM_PADDING_WARNING = (
    "this package is for testing only: SoftHSM pads the PKCS#8 plaintext of RSA/EC keys with "
    "zero bytes to a multiple of 8 before AES-KWP, so the package may unwrap to the PKCS#8 DER "
    "followed by up to 7 zero bytes; whether Managed HSM accepts that is not public (never "
    "import this package into a production HSM), this project's Managed HSM emulator refuses "
    "it, and only the tests strip the padding"
)


def pads_private_keys_with_zeros(manufacturer: str, model: str) -> bool:
    """Whether a token is known to zero-pad private-key plaintext before AES-KWP (SoftHSM2)."""
    return manufacturer.strip() == SOFTHSM_MANUFACTURER or model.strip().startswith("SoftHSM")


def der_sequence_length(data: bytes) -> int:
    """Total length (header + content) of the DER SEQUENCE that ``data`` starts with.

    Raises:
        WrapError: reason ``bad_plaintext`` when ``data`` does not start with a definite-length
            SEQUENCE that fits in it.
    """
    if len(data) < 2 or data[0] != 0x30:
        raise WrapError("the plaintext is not a DER SEQUENCE", reason="bad_plaintext")
    first = data[1]
    if first < 0x80:
        header, content = 2, first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or len(data) < 2 + count:
            raise WrapError("the plaintext has a malformed DER length", reason="bad_plaintext")
        header, content = 2 + count, int.from_bytes(data[2 : 2 + count], "big")
    total = header + content
    if total > len(data):
        raise WrapError("the plaintext's DER SEQUENCE is truncated", reason="bad_plaintext")
    return total


def zero_padding_length(plaintext: SecretBytes) -> int:
    """How many trailing bytes follow the PKCS#8 SEQUENCE (0 for a canonical plaintext).

    Raises:
        WrapError: reason ``bad_plaintext`` (not DER), or ``bad_padding`` when the trailing
            bytes are not 1-7 zero bytes, i.e. not the SoftHSM zero padding.
    """
    data = plaintext.reveal()
    total = der_sequence_length(data)
    trailing = data[total:]
    if len(trailing) > MAX_ZERO_PADDING or trailing.strip(b"\0"):
        raise WrapError(
            f"{len(trailing)} bytes follow the PKCS#8 DER and they are not zero padding",
            reason="bad_padding",
        )
    return len(trailing)


def strip_zero_padding(plaintext: SecretBytes) -> SecretBytes:
    """The PKCS#8 DER without SoftHSM's trailing zero bytes (unchanged if there are none).

    Raises:
        WrapError: see :func:`zero_padding_length`.
    """
    pad = zero_padding_length(plaintext)
    if pad == 0:
        return plaintext
    return SecretBytes(plaintext.reveal()[:-pad], label="target")
