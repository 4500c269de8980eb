"""Key material held by the emulator: RSA and EC private keys, AES keys.

:class:`KeyMaterial` wraps the private half and never shows it in ``repr``. It converts to
and from the forms the emulator needs: the public JWK fields of a key bundle, PKCS#8 DER (or
raw AES bytes) for sealed storage and BYOK plaintexts, and private JWKs for plaintext import.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from offline_packager.errors import PackageFormatError, TargetKeyError
from offline_packager.keytypes import CURVE_BY_OPENSSL_NAME, TargetType, type_for
from offline_packager.package_format import b64url_decode, b64url_encode
from offline_packager.secret import SecretBytes

from .errors import BadParameterError

Family = Literal["RSA", "EC", "oct"]
FAMILIES: tuple[Family, ...] = ("RSA", "EC", "oct")
RSA_PUBLIC_EXPONENT = 65537
RandBytes = Callable[[int], bytes]


def family_of(kty: object) -> Family:
    """``RSA``/``RSA-HSM`` -> ``RSA`` and so on.

    Raises:
        BadParameterError: reason ``bad_kty`` for any other value.
    """
    if isinstance(kty, str):
        fam = kty.removesuffix("-HSM")
        for family in FAMILIES:
            if fam == family:
                return family
    raise BadParameterError(
        "kty must be one of RSA-HSM, EC-HSM, oct-HSM (or RSA, EC, oct)", reason="bad_kty"
    )


def hsm_kty(family: Family) -> str:
    """Managed HSM reports every key in its ``-HSM`` form."""
    return f"{family}-HSM"


def int_to_b64(value: int, length: int | None = None) -> str:
    """Big-endian unsigned base64url (minimal length unless ``length`` is given)."""
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url_encode(value.to_bytes(size, "big"))


def _b64_field(jwk: Mapping[str, Any], field: str) -> bytes:
    value = jwk.get(field)
    if not isinstance(value, str) or not value:
        raise BadParameterError(f"the JWK lacks field {field!r}", reason="bad_jwk")
    try:
        return b64url_decode(value)
    except PackageFormatError:
        raise BadParameterError(f"JWK field {field!r} is not base64url", reason="bad_jwk") from None


def _b64_int(jwk: Mapping[str, Any], field: str) -> int:
    return int.from_bytes(_b64_field(jwk, field), "big")


@dataclass(frozen=True, repr=False)
class KeyMaterial:
    """The private material of one key version. ``repr`` never shows it."""

    family: Family
    rsa_key: rsa.RSAPrivateKey | None = None
    ec_key: ec.EllipticCurvePrivateKey | None = None
    aes_key: SecretBytes | None = None

    def __repr__(self) -> str:
        return f"<KeyMaterial {self.describe()}, redacted>"

    # --- descriptors -------------------------------------------------------------------

    @property
    def key_size(self) -> int | None:
        """Bits for RSA and oct keys, None for EC."""
        if self.rsa_key is not None:
            return self.rsa_key.key_size
        if self.aes_key is not None:
            return len(self.aes_key) * 8
        return None

    @property
    def crv(self) -> str | None:
        """The JWK curve name of an EC key (``P-256`` ... ``P-256K``)."""
        if self.ec_key is None:
            return None
        return CURVE_BY_OPENSSL_NAME.get(self.ec_key.curve.name)

    def describe(self) -> str:
        """E.g. ``RSA-3072``, ``EC P-384``, ``oct-256``."""
        if self.family == "EC":
            return f"EC {self.crv}"
        return f"{self.family}-{self.key_size}"

    def target_type(self) -> TargetType:
        """The supported type this key is.

        Raises:
            TargetKeyError: an unsupported size or curve (e.g. RSA-1024).
        """
        return type_for(self.family, key_size=self.key_size, crv=self.crv)

    # --- public view ---------------------------------------------------------------------

    def public_jwk(self) -> dict[str, str]:
        """The public JWK fields (``n``/``e`` or ``crv``/``x``/``y``); nothing for oct."""
        if self.rsa_key is not None:
            numbers = self.rsa_key.public_key().public_numbers()
            return {"n": int_to_b64(numbers.n), "e": int_to_b64(numbers.e)}
        if self.ec_key is not None:
            pub = self.ec_key.public_key().public_numbers()
            size = (self.ec_key.curve.key_size + 7) // 8
            return {
                "crv": self.crv or "",
                "x": int_to_b64(pub.x, size),
                "y": int_to_b64(pub.y, size),
            }
        return {}

    # --- storage -------------------------------------------------------------------------

    def to_storage(self) -> SecretBytes:
        """PKCS#8 DER for RSA/EC, raw bytes for oct (what gets sealed at rest)."""
        if self.aes_key is not None:
            return SecretBytes(self.aes_key.reveal(), label="aes key")
        key = self.rsa_key if self.rsa_key is not None else self.ec_key
        if key is None:  # pragma: no cover - constructors guarantee one of the three
            raise ValueError("empty key material")
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return SecretBytes(der, label="pkcs8")

    @classmethod
    def from_storage(cls, family: Family, data: SecretBytes) -> KeyMaterial:
        """Inverse of :meth:`to_storage`.

        Raises:
            BadParameterError: reason ``target_not_pkcs8`` / ``kty_mismatch`` (see
                :meth:`from_plaintext`).
        """
        return cls.from_plaintext(family, data)

    @classmethod
    def from_plaintext(cls, family: Family, plaintext: SecretBytes) -> KeyMaterial:
        """Read a BYOK plaintext: PKCS#8 DER for RSA/EC, raw AES bytes for oct.

        Raises:
            BadParameterError: reason ``kty_mismatch`` when the plaintext is another kind of key
                than ``family``, ``plaintext_trailing_zeros`` when RSA/EC bytes are PKCS#8 followed
                by 1-7 zero bytes (SoftHSM2's padding), ``target_not_pkcs8`` when they are
                otherwise not PKCS#8, ``target_invalid`` for an inconsistent RSA key.
        """
        if family == "oct":
            if len(plaintext) not in (16, 24, 32):
                raise BadParameterError(
                    f"the unwrapped key is {len(plaintext)} bytes, not an AES-128/192/256 key; "
                    "it does not match kty oct-HSM",
                    reason="kty_mismatch",
                )
            return cls("oct", aes_key=SecretBytes(plaintext.reveal(), label="aes key"))
        try:
            # OpenSSL's full RSA check (primality tests) costs ~30 ms per key and would make
            # RSA imports the emulator's bottleneck; _check_rsa_numbers is the cheap equivalent
            # for keys that were consistent when wrapped.
            key = serialization.load_der_private_key(
                plaintext.reveal(), password=None, unsafe_skip_rsa_key_validation=True
            )
        except (ValueError, TypeError, UnsupportedAlgorithm):
            if len(plaintext) in (16, 24, 32):
                raise BadParameterError(
                    f"the unwrapped key is a {len(plaintext) * 8}-bit AES key; "
                    f"it does not match kty {family}-HSM",
                    reason="kty_mismatch",
                ) from None
            zeros = _trailing_zeros_after_pkcs8(plaintext.reveal())
            if zeros:
                # Whether Managed HSM accepts such packages is not public: refuse, but say why.
                raise BadParameterError(
                    f"the unwrapped plaintext is a PKCS#8 private key followed by {zeros} zero "
                    "byte(s); a PKCS#11 token such as SoftHSM2 likely zero-padded the key to a "
                    "multiple of 8 bytes before wrapping it (AES-KWP pads by itself). Wrap the "
                    "exact PKCS#8 DER (e.g. with offline_packager or OpenSSL) instead",
                    reason="plaintext_trailing_zeros",
                ) from None
            raise BadParameterError(
                "the unwrapped key is not a PKCS#8 private key", reason="target_not_pkcs8"
            ) from None
        if isinstance(key, rsa.RSAPrivateKey) and family == "RSA":
            _check_rsa_numbers(key)
            return cls("RSA", rsa_key=key)
        if isinstance(key, ec.EllipticCurvePrivateKey) and family == "EC":
            return cls("EC", ec_key=key)
        found = (
            "an RSA"
            if isinstance(key, rsa.RSAPrivateKey)
            else "an EC"
            if isinstance(key, ec.EllipticCurvePrivateKey)
            else "another kind of"
        )
        raise BadParameterError(
            f"the unwrapped key is {found} key; it does not match kty {family}-HSM",
            reason="kty_mismatch",
        )

    # --- creation --------------------------------------------------------------------------

    @classmethod
    def generate(
        cls,
        family: Family,
        *,
        key_size: int | None,
        crv: str | None,
        randbytes: RandBytes = os.urandom,
    ) -> KeyMaterial:
        """Create a new key of a supported type.

        Raises:
            BadParameterError: reason ``unsupported_key_type`` for sizes/curves Managed HSM lacks.
        """
        if family == "RSA" and key_size is None:
            key_size = 2048
        if family == "oct" and key_size is None:
            key_size = 256
        if family == "EC" and crv is None:
            crv = "P-256"
        target = checked_type(family, key_size=key_size, crv=crv)
        if family == "RSA":
            return cls("RSA", rsa_key=rsa.generate_private_key(RSA_PUBLIC_EXPONENT, key_size or 0))
        if family == "EC":
            return cls("EC", ec_key=ec.generate_private_key(target.curve()))
        return cls("oct", aes_key=SecretBytes(randbytes((key_size or 0) // 8), label="aes key"))

    @classmethod
    def from_private_jwk(cls, family: Family, jwk: Mapping[str, Any]) -> KeyMaterial:
        """Read a plaintext private JWK (``d``/``p``/``q``..., ``d``/``x``/``y``, or ``k``).

        Raises:
            BadParameterError: reasons ``bad_jwk`` (missing, malformed or inconsistent fields)
                and ``unsupported_key_type``.
        """
        if family == "oct":
            k = _b64_field(jwk, "k")
            checked_type("oct", key_size=len(k) * 8, crv=None)
            return cls("oct", aes_key=SecretBytes(k, label="aes key"))
        if family == "RSA":
            return cls._rsa_from_jwk(jwk)
        return cls._ec_from_jwk(jwk)

    @classmethod
    def _rsa_from_jwk(cls, jwk: Mapping[str, Any]) -> KeyMaterial:
        n, e, d = _b64_int(jwk, "n"), _b64_int(jwk, "e"), _b64_int(jwk, "d")
        p, q = _b64_int(jwk, "p"), _b64_int(jwk, "q")
        dp = _b64_int(jwk, "dp") if jwk.get("dp") else rsa.rsa_crt_dmp1(d, p)
        dq = _b64_int(jwk, "dq") if jwk.get("dq") else rsa.rsa_crt_dmq1(d, q)
        qi = _b64_int(jwk, "qi") if jwk.get("qi") else rsa.rsa_crt_iqmp(p, q)
        checked_type("RSA", key_size=n.bit_length(), crv=None)
        try:
            key = rsa.RSAPrivateNumbers(
                p, q, d, dp, dq, qi, rsa.RSAPublicNumbers(e, n)
            ).private_key()
        except ValueError:
            raise BadParameterError(
                "the RSA JWK's private fields are inconsistent", reason="bad_jwk"
            ) from None
        return cls("RSA", rsa_key=key)

    @classmethod
    def _ec_from_jwk(cls, jwk: Mapping[str, Any]) -> KeyMaterial:
        crv = jwk.get("crv")
        if not isinstance(crv, str):
            raise BadParameterError("an EC JWK needs crv", reason="bad_jwk")
        target = checked_type("EC", key_size=None, crv=crv)
        d, x, y = _b64_int(jwk, "d"), _b64_int(jwk, "x"), _b64_int(jwk, "y")
        try:
            key = ec.derive_private_key(d, target.curve())
        except ValueError:
            raise BadParameterError("the EC JWK's d is out of range", reason="bad_jwk") from None
        pub = key.public_key().public_numbers()
        if (pub.x, pub.y) != (x, y):
            raise BadParameterError("the EC JWK's x/y do not match its d", reason="bad_jwk")
        return cls("EC", ec_key=key)


def _der_length(data: bytes) -> int | None:
    """Total length of the DER SEQUENCE at the start of ``data``, or None if it is not one."""
    if len(data) < 2 or data[0] != 0x30:  # SEQUENCE tag
        return None
    first = data[1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    if not 1 <= count <= 4 or len(data) < 2 + count:
        return None
    return 2 + count + int.from_bytes(data[2 : 2 + count], "big")


def _trailing_zeros_after_pkcs8(data: bytes) -> int:
    """1-7 if ``data`` is a loadable PKCS#8 private key followed by that many zero bytes (what
    SoftHSM2 produces when it KWP-wraps a key whose DER length is not a multiple of 8), else 0.
    """
    end = _der_length(data)
    if end is None or not 1 <= len(data) - end <= 7 or any(data[end:]):
        return 0
    try:
        serialization.load_der_private_key(
            data[:end], password=None, unsafe_skip_rsa_key_validation=True
        )
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return 0
    return len(data) - end


def _check_rsa_numbers(key: rsa.RSAPrivateKey) -> None:
    """Refuse an RSA private key whose numbers do not fit together (damaged or forged).

    Checks n = p*q, e*d = 1 mod lcm(p-1, q-1), the CRT values, and one sign/verify round
    trip; not the primality of p and q.

    Raises:
        BadParameterError: reason ``target_invalid``.
    """
    nums = key.private_numbers()
    n, e = nums.public_numbers.n, nums.public_numbers.e
    p, q, d = nums.p, nums.q, nums.d
    lam = math.lcm(p - 1, q - 1)
    ok = (
        p * q == n
        and p > 1
        and q > 1
        and (e * d) % lam == 1
        and nums.dmp1 == d % (p - 1)
        and nums.dmq1 == d % (q - 1)
        and (nums.iqmp * q) % p == 1
    )
    if ok:
        probe = b"managed-hsm-emulator consistency probe"
        try:
            key.public_key().verify(
                key.sign(probe, padding.PKCS1v15(), hashes.SHA256()),
                probe,
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature:
            ok = False
    if not ok:
        raise BadParameterError(
            "the unwrapped RSA key is inconsistent (damaged key material)", reason="target_invalid"
        )


def checked_type(family: Family, *, key_size: int | None, crv: str | None) -> TargetType:
    """The supported type for a family and size/curve.

    Raises:
        BadParameterError: reason ``unsupported_key_type``, naming what is supported.
    """
    try:
        return type_for(family, key_size=key_size, crv=crv)
    except TargetKeyError:
        supported = {
            "RSA": "RSA 2048, 3072, 4096",
            "EC": "curves P-256, P-384, P-521, P-256K",
            "oct": "AES 128, 192, 256",
        }[family]
        what = f"curve {crv}" if family == "EC" else f"{family}-{key_size}"
        raise BadParameterError(
            f"{what} is not supported by Managed HSM ({supported})",
            reason="unsupported_key_type",
        ) from None
