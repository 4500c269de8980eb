"""Typed errors with stable reason codes.

Every refusal raised by the packager (and by the format checks the connected side reuses) is a
:class:`ByokError` subclass carrying a ``reason`` code. Reason codes are part of the public
interface: automation and dashboards match on them, so they never change meaning.
Messages never contain key material.
"""

from __future__ import annotations


class ByokError(Exception):
    """Base class: a refusal with a stable ``reason`` code and a human sentence."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.reason


class PackageFormatError(ByokError):
    """The .byok file is malformed (JSON, fields, base64url, lengths)."""

    reason = "malformed_package"


class KidError(ByokError):
    """A key identifier is malformed, versionless, or names another HSM."""

    reason = "bad_kid"


class KekError(ByokError):
    """The KEK is not an acceptable RSA 2048/3072/4096 public key, or does not match."""

    reason = "kek_invalid"


class TargetKeyError(ByokError):
    """The target key cannot be read, or is of an unsupported type, size or curve."""

    reason = "unsupported_target"


class WrapError(ByokError):
    """Wrapping or unwrapping failed (wrong KEK, tampered ciphertext)."""

    reason = "unwrap_failed"


class OutputError(ByokError):
    """An output file exists (and --force was not given) or cannot be written."""

    reason = "output_exists"


class Pkcs11Error(ByokError):
    """A PKCS#11 token operation failed or the token lacks a needed mechanism."""

    reason = "pkcs11_error"


class ApprovalError(ByokError):
    """A signed import approval, or the list of approvers, is refused.

    ``reason`` is one of ``approval_invalid`` (malformed, wrong signer, bad signature),
    ``approval_wrong_package`` (signed over another manifest or package),
    ``approval_expired`` (the approval or its approver is out of its validity window) and
    ``approvers_invalid`` (the approvers document is malformed; the message names the field).
    """

    reason = "approval_invalid"


class SignerKeyError(ByokError):
    """The key an approver signs with cannot be used (wrong type or size, unreadable)."""

    reason = "bad_signer_key"


class AttestationError(ByokError):
    """A KEK attestation is refused.

    ``reason`` is one of ``attestation_chain_invalid`` (no chain from a trusted root to the
    certificate that signs the attestation), ``attestation_signature_invalid`` (the blob's
    signature does not verify: altered bytes), ``attestation_key_mismatch`` (the attested key is
    not this KEK), ``attestation_key_extractable`` (the attested attributes allow export, or the
    key was not generated inside the HSM) and ``attestation_format_unsupported`` (a layout,
    version or attribute this verifier does not understand; it refuses rather than guesses).
    """

    reason = "attestation_format_unsupported"
