"""What ``byok-package``'s subcommands share: input files, secrets, the KEK and its checks.

Imports only what reading a KEK needs: the attestation verifier (``cryptography.x509``) is
imported when an attestation is given, so a plain ``wrap`` starts without it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import TOOL_NAME
from .errors import ByokError
from .kek import Kek, load_kek_pem, verify_fingerprint
from .kid import KeyId, parse_kid
from .packager import KekContext

if TYPE_CHECKING:
    from .attestation import AttestationResult, TrustAnchor

Clock = Callable[[], datetime]
SecretProvider = Callable[[], bytes]


def read_file(path: str, what: str, *, limit: int = 1024 * 1024) -> bytes:
    """The bytes of ``path``, at most ``limit``.

    Raises:
        ByokError: ``unreadable_input`` (cannot be read, or larger than ``limit``).
    """
    try:
        with Path(path).open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise ByokError(
            f"cannot read {what} {path}: {exc.strerror}", reason="unreadable_input"
        ) from None
    if len(data) > limit:
        raise ByokError(f"{what} {path} is larger than {limit} bytes", reason="unreadable_input")
    return data


def env_secret(var: str | None, prompt: str, *, remember: bool = False) -> SecretProvider:
    """A provider of a secret from the environment variable ``var``, else a terminal prompt.

    Nothing is read until the provider is called. With ``remember`` the prompt is asked once
    and its answer reused by later calls (a batch: one passphrase for its encrypted keys).

    The provider raises:
        ByokError: ``bad_passphrase`` (``var`` unset; no terminal to prompt on).
    """
    remembered: list[bytes] = []

    def provide() -> bytes:
        if var:
            value = os.environ.get(var)
            if value is None:
                raise ByokError(f"environment variable {var} is not set", reason="bad_passphrase")
            return value.encode()
        if remembered:
            return remembered[0]
        if not sys.stdin.isatty():
            raise ByokError(
                f"{prompt} needed: set it with an environment variable option",
                reason="bad_passphrase",
            )
        import getpass

        value_bytes = getpass.getpass(f"{prompt}: ").encode()
        if remember:
            remembered.append(value_bytes)
        return value_bytes

    return provide


def warn(message: str) -> None:
    """One ``byok-package: warning: ...`` line on stderr."""
    print(f"{TOOL_NAME}: warning: {message}", file=sys.stderr)


def load_kek(args: argparse.Namespace) -> Kek:
    """``--kek``, checked against ``--kek-sha256`` when given (else a warning shows its SHA-256).

    Raises:
        KekError: ``malformed_pem``, ``kek_not_rsa``, ``kek_wrong_size``, ``bad_fingerprint``,
            ``kek_fingerprint_mismatch``.
        ByokError: ``unreadable_input``.
    """
    kek = load_kek_pem(read_file(args.kek, "KEK file", limit=64 * 1024))
    if args.kek_sha256:
        verify_fingerprint(kek, args.kek_sha256)
    else:
        warn(
            "no --kek-sha256: the KEK file was not checked against the fingerprint shown on "
            f"the connected side (this file: {kek.fingerprint})"
        )
    return kek


def trust_anchors(args: argparse.Namespace) -> tuple[TrustAnchor, ...]:
    """The pinned Marvell roots, plus the test root named by ``--trust-test-root`` (with a test
    root, vendor roots that are not installed are left out: an emulator's attestation).

    Raises:
        AttestationError: ``attestation_chain_invalid`` (a vendor root not installed, altered;
            an unusable test root).
        ByokError: ``unreadable_input``.
    """
    from .attestation import load_test_root, pinned_roots

    anchors = pinned_roots(require_all=not args.trust_test_root)
    if args.trust_test_root:
        root = load_test_root(read_file(args.trust_test_root, "test root", limit=64 * 1024))
        warn(
            f"trusting the TEST root {args.trust_test_root} (SHA-256 {root.sha256}): an "
            "emulator's attestation, never a real HSM's"
        )
        anchors = (*anchors, root)
    return anchors


def verify_attestation(
    args: argparse.Namespace, kek: Kek, kek_kid: KeyId | None, clock: Clock
) -> AttestationResult:
    """Verify ``--kek-attestation`` against the KEK, offline.

    Raises:
        AttestationError: the five ``attestation_*`` reasons.
        ByokError: ``unreadable_input``.
    """
    from .attestation import verify_kek_attestation

    data = read_file(args.kek_attestation, "KEK attestation")
    return verify_kek_attestation(
        data, kek, now=clock(), kek_kid=kek_kid, anchors=trust_anchors(args)
    )


def kek_context(args: argparse.Namespace, clock: Clock) -> KekContext:
    """The KEK to wrap under (``--kek-kid``, ``--kek``, ``--kek-sha256``, ``--kek-attestation``,
    ``--trust-test-root``), loaded and checked once.

    Raises:
        KidError: ``bad_kid``.
        KekError: as :func:`load_kek`.
        AttestationError: the five ``attestation_*`` reasons.
        ByokError: ``unreadable_input``; ``bad_arguments`` (``--trust-test-root`` without
            ``--kek-attestation``).
    """
    kek_kid = parse_kid(args.kek_kid)
    kek = load_kek(args)
    if args.kek_attestation:
        attestation = verify_attestation(args, kek, kek_kid, clock)
        return KekContext(kek, kek_kid, attestation.to_manifest())
    if args.trust_test_root:
        raise ByokError("--trust-test-root needs --kek-attestation", reason="bad_arguments")
    return KekContext(kek, kek_kid)


def add_kek_options(p: argparse.ArgumentParser) -> None:
    """``--kek``, ``--kek-kid``, ``--kek-sha256``: the KEK to wrap under (wrap, wrap-batch)."""
    p.add_argument(
        "--kek", required=True, metavar="KEK.pem", help="KEK public key (PEM SubjectPublicKeyInfo)"
    )
    p.add_argument(
        "--kek-kid", required=True, metavar="KID", help="the KEK's full kid, with its version"
    )
    p.add_argument(
        "--kek-sha256",
        metavar="HEX",
        help="SHA-256 of the KEK's SPKI as shown on the connected side: refuse on mismatch (strongly recommended)",
    )


def add_attestation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kek-attestation",
        metavar="FILE",
        help="the KEK's attestation (byok kek download --attestation): verified offline against "
        "the pinned Marvell roots and the KEK PEM; refuse on any doubt",
    )
    p.add_argument(
        "--trust-test-root",
        metavar="FILE",
        help="also trust this TEST root (the emulator's attestation-test-root.pem); never in "
        "production",
    )


def add_pkcs11_options(group: Any, *, key_label_help: str | None) -> None:
    """The token options, shared by ``wrap`` (HSM mode), ``wrap-batch`` (without
    ``--key-label``: ``key_label_help`` None) and ``approve`` (token signer)."""
    group.add_argument(
        "--pkcs11-module",
        metavar="LIB",
        help="PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so",
    )
    group.add_argument("--token-label", metavar="LABEL", help="token label")
    group.add_argument(
        "--pin-env", metavar="VAR", help="environment variable holding the user PIN (else prompt)"
    )
    if key_label_help is not None:
        group.add_argument("--key-label", metavar="LABEL", help=key_label_help)
