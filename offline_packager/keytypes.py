"""The target key types Managed HSM accepts, and how to recognise them from lengths."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cryptography.hazmat.primitives.asymmetric import ec

from .errors import TargetKeyError

Family = Literal["RSA", "EC", "oct"]


@dataclass(frozen=True)
class TargetType:
    """One supported target type, e.g. ``rsa-3072`` or ``ec-p256k``."""

    name: str
    family: Family
    kty: str  # as Managed HSM reports it: RSA-HSM / EC-HSM / oct-HSM
    key_size: int | None  # bits, RSA and oct
    crv: str | None  # JWK curve name, EC only
    # KWP lengths this type's typical encoding produces (used to infer an unstated type).
    typical_kwp: frozenset[int]
    # KWP lengths any plausible encoding produces (a stated type must fall in this range).
    kwp_min: int
    kwp_max: int

    @property
    def default_key_ops(self) -> tuple[str, ...]:
        return DEFAULT_KEY_OPS[self.family]

    @property
    def allowed_key_ops(self) -> frozenset[str]:
        return ALLOWED_KEY_OPS[self.family]

    def curve(self) -> ec.EllipticCurve:
        if self.crv is None:
            raise TargetKeyError(f"{self.name} is not an EC type")
        return _CURVES[self.crv]()


DEFAULT_KEY_OPS: dict[Family, tuple[str, ...]] = {
    "RSA": ("sign", "verify", "encrypt", "decrypt", "wrapKey", "unwrapKey"),
    "EC": ("sign", "verify"),
    "oct": ("encrypt", "decrypt", "wrapKey", "unwrapKey"),
}
ALLOWED_KEY_OPS: dict[Family, frozenset[str]] = {
    family: frozenset(ops) for family, ops in DEFAULT_KEY_OPS.items()
}

_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
    "P-256K": ec.SECP256K1,
}
CURVE_BY_OPENSSL_NAME: dict[str, str] = {cls().name: crv for crv, cls in _CURVES.items()}

# Lengths: see byok-facts.md section 2. RSA PKCS#8 sizes vary by a few bytes with the integers'
# leading bits; EC sizes vary with the optional public key and parameters in ECPrivateKey.
TARGET_TYPES: dict[str, TargetType] = {
    t.name: t
    for t in (
        TargetType("rsa-2048", "RSA", "RSA-HSM", 2048, None, frozenset({1224, 1232}), 1200, 1240),
        TargetType("rsa-3072", "RSA", "RSA-HSM", 3072, None, frozenset({1800, 1808}), 1776, 1816),
        TargetType("rsa-4096", "RSA", "RSA-HSM", 4096, None, frozenset({2384}), 2360, 2400),
        TargetType("ec-p256", "EC", "EC-HSM", None, "P-256", frozenset({152}), 80, 160),
        TargetType("ec-p384", "EC", "EC-HSM", None, "P-384", frozenset({200}), 88, 208),
        TargetType("ec-p521", "EC", "EC-HSM", None, "P-521", frozenset({256}), 104, 264),
        TargetType("ec-p256k", "EC", "EC-HSM", None, "P-256K", frozenset({144}), 72, 152),
        TargetType("oct-128", "oct", "oct-HSM", 128, None, frozenset({24}), 24, 24),
        TargetType("oct-192", "oct", "oct-HSM", 192, None, frozenset({32}), 32, 32),
        TargetType("oct-256", "oct", "oct-HSM", 256, None, frozenset({40}), 40, 40),
    )
}
TYPE_NAMES: tuple[str, ...] = tuple(TARGET_TYPES)
RSA_SIZES = frozenset({2048, 3072, 4096})
KEK_SIZES = RSA_SIZES


def get_type(name: str) -> TargetType:
    """Return the type called ``name``; raise :class:`TargetKeyError` if unsupported."""
    try:
        return TARGET_TYPES[name.lower()]
    except KeyError:
        raise TargetKeyError(
            f"unsupported target type {name!r}; supported: {', '.join(TYPE_NAMES)}",
        ) from None


def type_for(family: str, *, key_size: int | None = None, crv: str | None = None) -> TargetType:
    """Find the type for a family and size/curve; raise :class:`TargetKeyError` if unsupported."""
    fam = family.removesuffix("-HSM")
    for t in TARGET_TYPES.values():
        if t.family != fam:
            continue
        if fam == "EC" and t.crv == crv:
            return t
        if fam != "EC" and t.key_size == key_size:
            return t
    if fam == "RSA":
        raise TargetKeyError(
            f"RSA-{key_size} targets are not supported (Managed HSM takes 2048, 3072, 4096)",
        )
    if fam == "EC":
        raise TargetKeyError(
            f"curve {crv} is not supported (P-256, P-384, P-521, P-256K)",
            reason="unsupported_curve",
        )
    if fam == "oct":
        raise TargetKeyError(f"AES-{key_size} is not supported (128, 192, 256)")
    raise TargetKeyError(f"key family {family!r} is not supported")


def infer_from_kwp_length(kwp_len: int) -> TargetType | None:
    """The target type whose typical encoding wraps to ``kwp_len`` bytes, or None if unknown."""
    matches = [t for t in TARGET_TYPES.values() if kwp_len in t.typical_kwp]
    return matches[0] if len(matches) == 1 else None


def kwp_length_plausible(target: TargetType, kwp_len: int) -> bool:
    """Whether a KWP block of ``kwp_len`` bytes can hold a key of ``target`` type."""
    return target.kwp_min <= kwp_len <= target.kwp_max
