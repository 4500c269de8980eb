"""Offline structural checks of a .byok package, needing no secret.

Used by ``byok-package inspect`` (which reports every finding) and by the connected side's
validation (which refuses on the first finding).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from .errors import ByokError
from .kek import Kek
from .keytypes import (
    KEK_SIZES,
    TargetType,
    get_type,
    infer_from_kwp_length,
    kwp_length_plausible,
)
from .kid import KeyId, parse_kid
from .package_format import MAX_PACKAGE_BYTES, ByokPackage, parse_package


@dataclass(frozen=True)
class Finding:
    """One problem: a stable reason code and a sentence (no key material)."""

    reason: str
    message: str


@dataclass
class PackageReport:
    """What the checks found out about a package."""

    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    package: ByokPackage | None = None
    kid: KeyId | None = None
    kek_size: int | None = None
    rsa_block_bytes: int | None = None
    kwp_bytes: int | None = None
    target_type: TargetType | None = None
    target_type_inferred: bool = False

    @property
    def valid(self) -> bool:
        return not self.findings

    def add(self, reason: str, message: str) -> None:
        self.findings.append(Finding(reason, message))

    def raise_first(self) -> None:
        """Raise the first finding as a :class:`ByokError` (connected-side validation)."""
        if self.findings:
            first = self.findings[0]
            raise ByokError(first.message, reason=first.reason)


def _candidate_kek_sizes(total: int, stated: TargetType | None) -> list[tuple[int, TargetType]]:
    out: list[tuple[int, TargetType]] = []
    for bits in sorted(KEK_SIZES):
        kwp = total - bits // 8
        if kwp < 16 or kwp % 8:
            continue
        if stated is not None:
            if kwp_length_plausible(stated, kwp):
                out.append((bits, stated))
        else:
            inferred = infer_from_kwp_length(kwp)
            if inferred is not None:
                out.append((bits, inferred))
    return out


def _infer_kek_size(report: PackageReport, total: int, stated: TargetType | None) -> bool:
    """Without the KEK, pick the one RSA size the length allows; False if none or several."""
    candidates = _candidate_kek_sizes(total, stated)
    if len(candidates) == 1:
        report.kek_size = candidates[0][0]
        report.notes.append(f"KEK size RSA-{report.kek_size} inferred from the length")
        return True
    if candidates:
        options = ", ".join(f"RSA-{b} KEK with {t.name}" for b, t in candidates)
        report.notes.append(f"the length fits several layouts ({options}); give --kek")
    else:
        report.add(
            "ciphertext_length_mismatch",
            f"a {total}-byte ciphertext fits no RSA 2048/3072/4096 block followed by the "
            "AES-KWP of a supported target",
        )
    return False


def _made_for_another_kek_size(
    report: PackageReport, total: int, stated: TargetType | None, kwp_len: int
) -> bool:
    """The kid names a real KEK, but the ciphertext's layout fits only a KEK of another size:
    the package was wrapped under another KEK (a KEK refusal, not a length or type one)."""
    assert report.kek_size is not None  # noqa: S101  # the caller set it from the KEK
    fits_this = kwp_len >= 16 and kwp_len % 8 == 0
    if fits_this and (
        kwp_length_plausible(stated, kwp_len)
        if stated is not None
        else infer_from_kwp_length(kwp_len) is not None
    ):
        return False
    others = sorted({bits for bits, _ in _candidate_kek_sizes(total, stated)} - {report.kek_size})
    if not others:
        return False
    sizes = " or ".join(f"RSA-{bits}" for bits in others)
    report.add(
        "kek_mismatch",
        f"the ciphertext's layout fits an {sizes} KEK, not the RSA-{report.kek_size} KEK the "
        "kid names: the package was wrapped under another KEK",
    )
    return True


def check_package(
    data: bytes,
    *,
    kek: Kek | None = None,
    kek_kid: str | None = None,
    stated_type: str | None = None,
    expected_host: str | None = None,
    max_bytes: int = MAX_PACKAGE_BYTES,
) -> PackageReport:
    """Check a package's structure against what is known of its KEK and target.

    ``kek`` (public key) enables the modulus checks; ``kek_kid`` must then equal the header
    kid; ``stated_type`` (e.g. ``rsa-3072``) must agree with the wrapped length, otherwise the
    type is inferred from it; ``expected_host`` pins the kid to one HSM.
    Never raises for bad input: every problem becomes a :class:`Finding`.
    """
    report = PackageReport()
    try:
        package = parse_package(data, max_bytes=max_bytes)
    except ByokError as exc:
        report.add(exc.reason, exc.message)
        return report
    report.package = package

    try:
        report.kid = parse_kid(package.kid, expected_host=expected_host)
    except ByokError as exc:
        report.add(exc.reason, exc.message)
    if kek_kid is not None and not hmac.compare_digest(package.kid, kek_kid):
        report.add("kek_mismatch", f"the package is wrapped for {package.kid}, not for {kek_kid}")

    stated: TargetType | None = None
    if stated_type is not None:
        try:
            stated = get_type(stated_type)
        except ByokError as exc:
            report.add("target_type_unknown", exc.message)
            return report

    if kek is not None:
        report.kek_size = kek.key_size
    elif not _infer_kek_size(report, len(package.ciphertext), stated):
        return report
    assert report.kek_size is not None  # noqa: S101  # set by either branch above
    total = len(package.ciphertext)
    k = report.kek_size // 8
    report.rsa_block_bytes = min(k, total)
    kwp_len = total - k
    if kek is not None and _made_for_another_kek_size(report, total, stated, kwp_len):
        return report
    if kwp_len < 16 or kwp_len % 8:
        report.add(
            "ciphertext_length_mismatch",
            f"a {total}-byte ciphertext cannot be a {k}-byte RSA block (RSA-{report.kek_size} "
            "KEK) followed by an AES-KWP block (a multiple of 8 bytes, at least 16)",
        )
        return report
    report.kwp_bytes = kwp_len
    if kek is not None:
        block = int.from_bytes(package.ciphertext[:k], "big")
        if block >= kek.public_key.public_numbers().n:
            report.add(
                "rsa_block_out_of_range",
                "the RSA block is not below the KEK modulus: it was not made with this KEK",
            )

    if stated is not None:
        report.target_type = stated
        if not kwp_length_plausible(stated, kwp_len):
            report.add(
                "target_type_mismatch",
                f"a {kwp_len}-byte wrapped key cannot hold a {stated.name} key "
                f"(expected {stated.kwp_min}-{stated.kwp_max} bytes)",
            )
    else:
        inferred = infer_from_kwp_length(kwp_len)
        if inferred is None:
            report.add(
                "target_type_unknown",
                f"a {kwp_len}-byte wrapped key matches no known target type; state the type",
            )
        else:
            report.target_type = inferred
            report.target_type_inferred = True
    return report
