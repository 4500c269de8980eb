"""Approval signing with a private key held in a PKCS#11 token (smartcard, HSM).

``byok-package approve ... --pkcs11-module LIB --token-label T --key-label L [--pin-env VAR]``

Module loading, token lookup, login and error translation are those of HSM-mode wrapping
(:mod:`offline_packager.pkcs11_source`). The signing key is the single private key object
labelled ``L``; its public part comes from the public key object with the same label *and*
``CKA_ID`` (RSA: the private object's modulus, cross-checked), exactly as for wrap targets.

Mechanisms (the private key never leaves the token):

- ES256 / ES384 (EC P-256 / P-384): ``CKM_ECDSA`` over a SHA-256 / SHA-384 digest computed in
  software; PKCS#11 returns ``r || s``, which is the JWS form.
- EdDSA (Ed25519, ``CKK_EC_EDWARDS``): ``CKM_EDDSA`` without parameters (pure Ed25519).
- PS256 (RSA >= 3072): ``CKM_SHA256_RSA_PKCS_PSS`` (SHA-256, MGF1-SHA-256, salt 32), else
  ``CKM_RSA_PKCS_PSS`` over a software SHA-256 digest with the same parameters.

Before an approval is written, :func:`offline_packager.approval.sign_approval` verifies the
token's signature with the public key read here, so a token that returns DER, or a public
object of another key, is caught. Keys that demand a context-specific login for each signature
(``CKA_ALWAYS_AUTHENTICATE``, e.g. PIV slot 9c) are not supported: python-pkcs11 0.10 offers no
``CKU_CONTEXT_SPECIFIC`` login; such a key is refused with ``pkcs11_error`` or ``pin_incorrect``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from .approval import ApproverPublicKey, alg_for_key
from .errors import Pkcs11Error, SignerKeyError
from .kek import spki_sha256
from .pkcs11_source import (
    PinProvider,
    _attr,
    _ec_public,
    _find_token,
    _import_pkcs11,
    _load_module,
    _objects_labelled,
    _open_session,
    _public_object,
    _rsa_public,
    _translate,
    _type_name,
)

if TYPE_CHECKING:
    from pkcs11 import Session
    from pkcs11.types import Object

CKM_RSA_PKCS_PSS = 0x0D
CKM_SHA256_RSA_PKCS_PSS = 0x43
CKM_ECDSA = 0x1041
CKM_EDDSA = 0x1057
PSS_SALT_BYTES = 32

# CKA_EC_PARAMS of an Ed25519 key: the OID 1.3.101.112, or the printable string "edwards25519"
# (PKCS#11 3.0 allows both; SoftHSM2 2.6 stores the latter).
ED25519_PARAMS = (bytes.fromhex("06032b6570"), b"\x13\x0cedwards25519")
_ED25519_POINT_BYTES = 32


@dataclass(frozen=True)
class TokenSignerRequest:
    """Which token and key sign: the same options as HSM-mode wrapping."""

    module: str
    token_label: str
    pin: PinProvider = field(repr=False)
    key_label: str


class TokenSigner:
    """An :class:`~offline_packager.approval.ApprovalSigner` over a token-held private key.

    Valid only inside :func:`token_signer`'s ``with`` block (the session is open there)."""

    def __init__(
        self, p11: ModuleType, key: Object, public_key: ApproverPublicKey, mechanisms: set[int]
    ) -> None:
        self._p11 = p11
        self._key = key
        self.public_key = public_key
        self.alg = alg_for_key(public_key)
        self.spki_sha256 = spki_sha256(public_key)
        self._mechanisms = mechanisms
        self.mechanism = self._pick_mechanism()

    def __repr__(self) -> str:
        return f"<token approval signer {self.alg} via {self.mechanism}, SPKI SHA-256 {self.spki_sha256}>"

    def _pick_mechanism(self) -> str:
        wanted = {
            "ES256": [(CKM_ECDSA, "CKM_ECDSA")],
            "ES384": [(CKM_ECDSA, "CKM_ECDSA")],
            "EdDSA": [(CKM_EDDSA, "CKM_EDDSA")],
            "PS256": [
                (CKM_SHA256_RSA_PKCS_PSS, "CKM_SHA256_RSA_PKCS_PSS"),
                (CKM_RSA_PKCS_PSS, "CKM_RSA_PKCS_PSS"),
            ],
        }[self.alg]
        for value, name in wanted:
            if value in self._mechanisms:
                return name
        raise Pkcs11Error(
            f"the token lists none of {', '.join(n for _, n in wanted)}, needed for {self.alg}",
            reason="mechanism_unsupported",
        )

    def sign(self, signing_input: bytes) -> bytes:
        """Sign in the token; returns the JWS-form signature.

        Raises:
            Pkcs11Error: the token refused (``mechanism_unsupported``, ``pin_incorrect``,
                ``pkcs11_error``).
        """
        from pkcs11 import MGF, Mechanism
        from pkcs11.types import SignMixin

        key = self._key
        if not isinstance(key, SignMixin):
            raise Pkcs11Error("the signing key object cannot sign (no CKA_SIGN)")
        with _translate(self._p11, "signing the approval"):
            if self.mechanism == "CKM_ECDSA":
                digest = (
                    hashlib.sha256(signing_input)
                    if self.alg == "ES256"
                    else hashlib.sha384(signing_input)
                ).digest()
                signature = key.sign(digest, mechanism=Mechanism.ECDSA)
            elif self.mechanism == "CKM_EDDSA":
                signature = key.sign(signing_input, mechanism=Mechanism.EDDSA)
            elif self.mechanism == "CKM_SHA256_RSA_PKCS_PSS":
                signature = key.sign(
                    signing_input,
                    mechanism=Mechanism.SHA256_RSA_PKCS_PSS,
                    mechanism_param=(Mechanism.SHA256, MGF.SHA256, PSS_SALT_BYTES),
                )
            else:
                signature = key.sign(
                    hashlib.sha256(signing_input).digest(),
                    mechanism=Mechanism.RSA_PKCS_PSS,
                    mechanism_param=(Mechanism.SHA256, MGF.SHA256, PSS_SALT_BYTES),
                )
        return bytes(signature)


@contextmanager
def token_signer(request: TokenSignerRequest) -> Iterator[TokenSigner]:
    """Open the token, log in, find the signing key; yield a signer while the session is open.

    The PIN provider is called once, after the module and token were found.

    Raises:
        Pkcs11Error: ``pkcs11_module_load``, ``token_not_found``, ``token_ambiguous``,
            ``pin_incorrect``, ``key_not_found``, ``key_ambiguous``, ``public_key_mismatch``,
            ``mechanism_unsupported``, ``pkcs11_error``.
        SignerKeyError: the key is not EC P-256/P-384, Ed25519 or RSA >= 3072
            (``bad_signer_key``).
        TargetKeyError: an EC key on a curve this project does not know (``unsupported_curve``).
    """
    p11 = _import_pkcs11()
    with _translate(p11, "opening the module"):
        lib = _load_module(p11, request.module)
        token = _find_token(lib, request.token_label)
        mechanisms = {int(m) for m in token.slot.get_mechanisms()}
    pin = request.pin()
    with _open_session(p11, token, pin, rw=False) as session:
        with _translate(p11, "finding the signing key"):
            key = _find_private_key(session, request.key_label)
            public_key = _signer_public(session, key)
        yield TokenSigner(p11, key, public_key, mechanisms)


def _find_private_key(session: Session, label: str) -> Object:
    from pkcs11 import ObjectClass

    keys = _objects_labelled(session, label, ObjectClass.PRIVATE_KEY)
    if not keys:
        raise Pkcs11Error(
            f"the token holds no private key labelled {label!r}", reason="key_not_found"
        )
    if len(keys) > 1:
        raise Pkcs11Error(
            f"{len(keys)} private keys are labelled {label!r}; give them unique labels",
            reason="key_ambiguous",
        )
    return keys[0]


def _signer_public(session: Session, key: Object) -> ApproverPublicKey:
    """The signing key's public key (its public object: same label and CKA_ID).

    Raises:
        SignerKeyError: a key type or size approvals do not accept.
        Pkcs11Error: the public part cannot be established.
    """
    from pkcs11 import Attribute, KeyType

    key_type = _attr(key, Attribute.KEY_TYPE)
    public_key: Any
    if key_type == KeyType.EC:
        public_key, _ = _ec_public(session, key)
    elif key_type == KeyType.RSA:
        public_key = _rsa_public(session, key)
    elif key_type == KeyType.EC_EDWARDS:
        public_key = _ed25519_public(session, key)
    else:
        raise SignerKeyError(
            f"{_type_name(key_type)} keys cannot sign approvals (EC P-256/P-384, Ed25519, "
            "RSA >= 3072)"
        )
    alg_for_key(public_key)  # refuses P-521, P-256K and RSA < 3072
    assert isinstance(public_key, ApproverPublicKey)  # noqa: S101  # alg_for_key accepted it
    return public_key


def _ed25519_public(session: Session, key: Object) -> ed25519.Ed25519PublicKey:
    from pkcs11 import Attribute, KeyType

    params = bytes(_attr(key, Attribute.EC_PARAMS) or b"")
    if params not in ED25519_PARAMS:
        raise SignerKeyError(
            f"the Edwards key's curve (CKA_EC_PARAMS {params.hex() or 'absent'}) is not Ed25519"
        )
    pub = _public_object(session, key, required=True)
    assert pub is not None  # noqa: S101  # required=True raises instead
    if _attr(pub, Attribute.KEY_TYPE) != KeyType.EC_EDWARDS:
        raise Pkcs11Error(
            "the public key object with the key's label and ID is not an Edwards key",
            reason="public_key_mismatch",
        )
    point = bytes(_attr(pub, Attribute.EC_POINT) or b"")
    if len(point) == _ED25519_POINT_BYTES + 2 and point[:2] == b"\x04\x20":
        point = point[2:]  # DER OCTET STRING, as the spec says
    if len(point) != _ED25519_POINT_BYTES:
        raise Pkcs11Error(
            "the Ed25519 public key object has no valid CKA_EC_POINT", reason="key_not_found"
        )
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(point)
    except ValueError:
        raise Pkcs11Error("the token returned an invalid Ed25519 public key") from None
