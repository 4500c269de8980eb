"""Signed import approvals: round trips, every refusal, random mutations, an independent JOSE
implementation (joserfc), signatures made by the OpenSSL CLI, the auditor's OpenSSL recipe from
docs/approvals.md run verbatim, and the `approve` / `inspect` command lines."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st
from packager_support import DOCS_APPROVALS, doc_block, ecdsa_der_to_raw, public_pem
from testsupport import make_kid, write_kek

from offline_packager.approval import (
    APPROVAL_TYPE,
    MAX_APPROVAL_BYTES,
    ApprovalClaims,
    ApprovalError,
    Approver,
    approval_signing_input,
    load_approvers,
    load_signer_key,
    make_approver,
    parse_approval,
    parse_approvers,
    sign_approval,
    software_signer,
    verify_approval,
)
from offline_packager.cli import main
from offline_packager.errors import ByokError, SignerKeyError
from offline_packager.kek import spki_sha256

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
NOT_AFTER = NOW + timedelta(days=7)
KEY_NAME = "payments-2026"
ALGS = ("ES256", "ES384", "EdDSA", "PS256")
PASSPHRASE = "correct horse battery staple"

SignerKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Package:
    folder: Path
    byok: Path
    manifest: Path

    @property
    def manifest_bytes(self) -> bytes:
        return self.manifest.read_bytes()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.byok.read_bytes()).hexdigest()


def _wrap(folder: Path, name: str, kek: rsa.RSAPrivateKey, target: str = "ec-p256") -> Package:
    folder.mkdir(parents=True, exist_ok=True)
    pem, _ = write_kek(folder, kek)
    out = folder / f"{name}.byok"
    argv = ["wrap", "--kek", str(pem), "--kek-kid", make_kid(), "--kek-sha256",
            spki_sha256(kek.public_key()), "--generate", target, "--out", str(out)]  # fmt: skip
    assert main(argv, clock=lambda: NOW) == 0
    return Package(folder, out, folder / f"{name}.manifest.json")


@pytest.fixture(scope="module")
def signer_keys() -> dict[str, SignerKey]:
    return {
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "ES384": ec.generate_private_key(ec.SECP384R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
        "PS256": rsa.generate_private_key(65537, 3072),
    }


@pytest.fixture(scope="module")
def pkg(keks: dict[int, rsa.RSAPrivateKey], tmp_path_factory: pytest.TempPathFactory) -> Package:
    return _wrap(tmp_path_factory.mktemp("approvals"), KEY_NAME, keks[2048])


@pytest.fixture(scope="module")
def other_pkg(
    keks: dict[int, rsa.RSAPrivateKey], tmp_path_factory: pytest.TempPathFactory
) -> Package:
    return _wrap(tmp_path_factory.mktemp("other"), "other-key", keks[3072], "oct-256")


def _approver(key: SignerKey, approver_id: str = "alice", **kw: Any) -> Approver:
    return make_approver(approver_id, key.public_key(), **kw)


def _sign(
    pkg: Package, key: SignerKey, approver_id: str = "alice", *, manifest: bytes | None = None
) -> bytes:
    return sign_approval(
        manifest=pkg.manifest_bytes if manifest is None else manifest,
        approver_id=approver_id,
        key_name=KEY_NAME,
        not_after=NOT_AFTER,
        signer=software_signer(key),
        now=NOW,
    )


def _header(pkg: Package, alg: str, **overrides: Any) -> dict[str, Any]:
    header: dict[str, Any] = {
        "alg": alg,
        "typ": APPROVAL_TYPE,
        "kid": "alice",
        "byok_key_name": KEY_NAME,
        "byok_package_sha256": pkg.sha256,
        "byok_manifest_sha256": hashlib.sha256(pkg.manifest_bytes).hexdigest(),
        "byok_signed_at": "2026-06-01T12:00:00Z",
        "byok_not_after": "2026-06-08T12:00:00Z",
    }
    header.update(overrides)
    return {k: v for k, v in header.items() if v is not None}


def _forge(manifest: bytes, header: dict[str, Any], key: SignerKey) -> bytes:
    """A correctly signed approval with any header (what a buggy or hostile signer can make)."""
    protected = b64url(json.dumps(header).encode())
    signature = software_signer(key).sign(approval_signing_input(protected, manifest))
    return json.dumps({"protected": protected, "signature": b64url(signature)}).encode()


def _members(data: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(data)
    return doc


def _with(data: bytes, **members: Any) -> bytes:
    doc = _members(data)
    doc.update(members)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


def _flip(text: str, index: int) -> str:
    """Flip one bit of the byte at ``index`` of the base64url-encoded value."""
    raw = bytearray(b64url_decode(text))
    raw[index] ^= 0x01
    return b64url(bytes(raw))


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS)
def test_round_trip(alg: str, pkg: Package, signer_keys: dict[str, SignerKey]) -> None:
    key = signer_keys[alg]
    data = _sign(pkg, key)
    assert data.endswith(b"\n")
    assert data.isascii()
    assert (
        data
        == (json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")) + "\n").encode()
    )
    assert set(json.loads(data)) == {"protected", "signature"}
    expected = ApprovalClaims(
        approver_id="alice",
        key_name=KEY_NAME,
        package_sha256=pkg.sha256,
        manifest_sha256=hashlib.sha256(pkg.manifest_bytes).hexdigest(),
        signed_at=NOW,
        not_after=NOT_AFTER,
        alg=alg,
    )
    assert parse_approval(data) == expected
    approvers = parse_approvers({"approvers": [{"id": "alice", "public_key_pem": public_pem(key)}]})
    assert (
        verify_approval(data, manifest=pkg.manifest_bytes, approver=approvers["alice"], now=NOW)
        == expected
    )
    header = json.loads(b64url_decode(json.loads(data)["protected"]))
    assert header["alg"] == alg
    assert header["typ"] == APPROVAL_TYPE


@pytest.mark.parametrize("alg", ["ES256", "ES384"])
def test_ecdsa_signature_is_raw_r_s(
    alg: str, pkg: Package, signer_keys: dict[str, SignerKey]
) -> None:
    key = signer_keys[alg]
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    data = _sign(pkg, key)
    doc = json.loads(data)
    raw = b64url_decode(doc["signature"])
    size = {"ES256": 32, "ES384": 48}[alg]
    assert len(raw) == 2 * size
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    der = encode_dss_signature(int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big"))
    digest = hashes.SHA256() if alg == "ES256" else hashes.SHA384()
    key.public_key().verify(
        der, approval_signing_input(doc["protected"], pkg.manifest_bytes), ec.ECDSA(digest)
    )


def test_times_are_cut_to_seconds_and_skew_is_allowed(
    pkg: Package, signer_keys: dict[str, SignerKey]
) -> None:
    key = signer_keys["ES256"]
    data = sign_approval(manifest=pkg.manifest_bytes, approver_id="alice", key_name=KEY_NAME,
                         not_after=NOT_AFTER + timedelta(microseconds=999),
                         signer=software_signer(key), now=NOW + timedelta(microseconds=500))  # fmt: skip
    claims = parse_approval(data)
    assert (claims.signed_at, claims.not_after) == (NOW, NOT_AFTER)
    approver = _approver(key)
    # the signer's clock may be up to 5 minutes ahead of the verifier's
    early = NOW - timedelta(minutes=4, seconds=59)
    assert (
        verify_approval(data, manifest=pkg.manifest_bytes, approver=approver, now=early) == claims
    )
    late = NOT_AFTER - timedelta(seconds=1)
    assert verify_approval(data, manifest=pkg.manifest_bytes, approver=approver, now=late) == claims


# --- refusals ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    pkg: Package
    other: Package
    keys: dict[str, SignerKey]

    @property
    def manifest(self) -> bytes:
        return self.pkg.manifest_bytes

    def good(self, alg: str = "ES256") -> bytes:
        return _sign(self.pkg, self.keys[alg])


# Each case: (reason, build(ctx) -> (approval bytes, manifest bytes, approver, now)).
Case = Callable[[Ctx], tuple[bytes, bytes, Approver, datetime]]


def _std(data: Callable[[Ctx], bytes], alg: str = "ES256") -> Case:
    return lambda c: (data(c), c.manifest, _approver(c.keys[alg]), NOW)


def _flip_signature(c: Ctx) -> bytes:
    good = c.good()
    return _with(good, signature=_flip(_members(good)["signature"], 10))


def _flip_header(c: Ctx) -> bytes:
    good = c.good()
    header = json.loads(b64url_decode(_members(good)["protected"]))
    header["byok_key_name"] = "payments-2027"  # another key, same signature
    return _with(
        good, protected=b64url(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    )


def _flip_header_bit(c: Ctx) -> bytes:
    good = c.good()
    protected = _members(good)["protected"]
    raw = bytearray(b64url_decode(protected))
    index = raw.index(b"alice") + 1
    raw[index] ^= 0x20  # "alice" -> "aLice": still a valid header, another kid
    return _with(good, protected=b64url(bytes(raw)))


def _flipped_manifest(c: Ctx) -> bytes:
    raw = bytearray(c.manifest)
    raw[len(raw) // 2] ^= 0x01
    return bytes(raw)


def _der_signature(c: Ctx) -> bytes:
    good = c.good()
    raw = b64url_decode(_members(good)["signature"])
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    return _with(good, signature=b64url(der))


def _forged(c: Ctx, alg: str = "ES256", **overrides: Any) -> bytes:
    return _forge(c.manifest, _header(c.pkg, alg, **overrides), c.keys[alg])


BIG_MANIFEST = b'{"schema_version": ' + b"1" * 5000 + b"}"
B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _non_canonical(text: str) -> str:
    """The same bytes with a non-zero unused low bit in the last character."""
    assert len(text) % 4 in {2, 3}
    last = B64URL_ALPHABET[B64URL_ALPHABET.index(text[-1]) | 1]
    changed = text[:-1] + last
    assert b64url_decode(changed) == b64url_decode(text)
    return changed


def _deep(depth: int) -> bytes:
    return b'{"protected":' + b"[" * depth + b"]" * depth + b',"signature":"AA"}'


REFUSALS: dict[str, tuple[str, Case]] = {
    "flipped bit in signature": ("approval_invalid", _std(_flip_signature)),
    "flipped bit in signature (PS256)": (
        "approval_invalid",
        _std(
            lambda c: _with(
                c.good("PS256"), signature=_flip(_members(c.good("PS256"))["signature"], 5)
            ),
            "PS256",
        ),
    ),
    "flipped bit in signature (EdDSA)": (
        "approval_invalid",
        _std(
            lambda c: _with(
                c.good("EdDSA"), signature=_flip(_members(c.good("EdDSA"))["signature"], 63)
            ),
            "EdDSA",
        ),
    ),
    "header changed, old signature": ("approval_invalid", _std(_flip_header)),
    "flipped bit in header (kid)": ("approval_invalid", _std(_flip_header_bit)),
    "flipped bit in manifest": (
        "approval_invalid",
        lambda c: (c.good(), _flipped_manifest(c), _approver(c.keys["ES256"]), NOW),
    ),
    "approval of another package's manifest": (
        "approval_invalid",
        lambda c: (c.good(), c.other.manifest_bytes, _approver(c.keys["ES256"]), NOW),
    ),
    "other package (signed header names another .byok)": (
        "approval_wrong_package",
        _std(lambda c: _forged(c, byok_package_sha256=c.other.sha256)),
    ),
    "other manifest (signed header names another manifest)": (
        "approval_wrong_package",
        _std(
            lambda c: _forged(
                c, byok_manifest_sha256=hashlib.sha256(c.other.manifest_bytes).hexdigest()
            )
        ),
    ),
    "signed payload is not a manifest": (
        "approval_wrong_package",
        lambda c: (
            _forge(
                b"[1]",
                _header(c.pkg, "ES256", byok_manifest_sha256=hashlib.sha256(b"[1]").hexdigest()),
                c.keys["ES256"],
            ),
            b"[1]",
            _approver(c.keys["ES256"]),
            NOW,
        ),
    ),
    "expired not_after": (
        "approval_expired",
        lambda c: (c.good(), c.manifest, _approver(c.keys["ES256"]), NOT_AFTER),
    ),
    "approver expired": (
        "approval_expired",
        lambda c: (c.good(), c.manifest, _approver(c.keys["ES256"], expires=NOW), NOW),
    ),
    "signed in the future beyond the clock skew": (
        "approval_expired",
        lambda c: (
            c.good(),
            c.manifest,
            _approver(c.keys["ES256"]),
            NOW - timedelta(minutes=5, seconds=1),
        ),
    ),
    "alg does not match the key (ES256 approval, Ed25519 approver)": (
        "approval_invalid",
        lambda c: (c.good(), c.manifest, _approver(c.keys["EdDSA"]), NOW),
    ),
    "alg does not match the key (ES384 header, P-256 approver)": (
        "approval_invalid",
        _std(lambda c: _forged(c, "ES384")),
    ),
    "PS256 approver with RSA-2048 key": (
        "approval_invalid",
        lambda c: (
            c.good("PS256"),
            c.manifest,
            Approver("alice", rsa.generate_private_key(65537, 2048).public_key(), "0" * 64),
            NOW,
        ),
    ),
    "kid is another approver": (
        "approval_invalid",
        lambda c: (c.good(), c.manifest, _approver(c.keys["ES256"], "bob"), NOW),
    ),
    "alg none": (
        "approval_invalid",
        _std(
            lambda c: _with(
                c.good(),
                protected=b64url(json.dumps(_header(c.pkg, "none")).encode()),
                signature=None,
            )
        ),
    ),
    "alg none, empty signature": (
        "approval_invalid",
        _std(
            lambda c: _with(
                c.good(),
                protected=b64url(json.dumps(_header(c.pkg, "none")).encode()),
                signature="",
            )
        ),
    ),
    "alg HS256": (
        "approval_invalid",
        _std(
            lambda c: _with(
                c.good(), protected=b64url(json.dumps(_header(c.pkg, "HS256")).encode())
            )
        ),
    ),
    "alg RS256": (
        "approval_invalid",
        _std(
            lambda c: _with(
                c.good(), protected=b64url(json.dumps(_header(c.pkg, "RS256")).encode())
            )
        ),
    ),
    "alg es256 (case)": (
        "approval_invalid",
        _std(
            lambda c: _with(
                c.good(), protected=b64url(json.dumps(_header(c.pkg, "es256")).encode())
            )
        ),
    ),
    "wrong typ": ("approval_invalid", _std(lambda c: _forged(c, typ="JWT"))),
    "crit header member": ("approval_invalid", _std(lambda c: _forged(c, crit=["b64"], b64=False))),
    "missing kid": ("approval_invalid", _std(lambda c: _forged(c, kid=None))),
    "kid with a newline": ("approval_invalid", _std(lambda c: _forged(c, kid="alice\n"))),
    "non-ASCII kid": ("approval_invalid", _std(lambda c: _forged(c, kid="al\u00efce"))),
    "bad key name": ("approval_invalid", _std(lambda c: _forged(c, byok_key_name="pay_ments"))),
    "upper-case hex": (
        "approval_invalid",
        _std(lambda c: _forged(c, byok_package_sha256=c.pkg.sha256.upper())),
    ),
    "time with offset": (
        "approval_invalid",
        _std(lambda c: _forged(c, byok_signed_at="2026-06-01T12:00:00+00:00")),
    ),
    "time not real": (
        "approval_invalid",
        _std(lambda c: _forged(c, byok_not_after="2026-02-30T12:00:00Z")),
    ),
    "time with non-ASCII digits": (
        "approval_invalid",
        _std(lambda c: _forged(c, byok_not_after="2026-06-0\u0668T12:00:00Z")),
    ),
    "not_after before signed_at": (
        "approval_invalid",
        _std(lambda c: _forged(c, byok_not_after="2026-06-01T12:00:00Z")),
    ),
    "time is a number": ("approval_invalid", _std(lambda c: _forged(c, byok_signed_at=1780000000))),
    "header is a list": (
        "approval_invalid",
        _std(lambda c: _with(c.good(), protected=b64url(b"[]"))),
    ),
    "header is not JSON": (
        "approval_invalid",
        _std(lambda c: _with(c.good(), protected=b64url(b"alg=ES256"))),
    ),
    "duplicate member in header": (
        "approval_invalid",
        _std(lambda c: _with(c.good(), protected=b64url(b'{"alg":"ES256","alg":"ES256"}'))),
    ),
    "duplicate member in approval": (
        "approval_invalid",
        _std(lambda c: c.good().replace(b'{"protected"', b'{"signature":"AA","protected"')),
    ),
    "5000-digit integer in approval": (
        "approval_invalid",
        _std(lambda c: b'{"protected":' + b"1" * 5000 + b',"signature":"AA"}'),
    ),
    "5000-digit integer in header": (
        "approval_invalid",
        _std(lambda c: _with(c.good(), protected=b64url(b'{"alg":' + b"9" * 5000 + b"}"))),
    ),
    "signed payload with a 5000-digit integer": (
        "approval_wrong_package",
        lambda c: (
            _forge(
                BIG_MANIFEST,
                _header(
                    c.pkg, "ES256", byok_manifest_sha256=hashlib.sha256(BIG_MANIFEST).hexdigest()
                ),
                c.keys["ES256"],
            ),
            BIG_MANIFEST,
            _approver(c.keys["ES256"]),
            NOW,
        ),
    ),
    "NaN in header": (
        "approval_invalid",
        _std(lambda c: _with(c.good(), protected=b64url(b'{"alg":NaN}'))),
    ),
    "deep nesting in approval": ("approval_invalid", _std(lambda c: _deep(5000))),
    "moderate nesting in approval": ("approval_invalid", _std(lambda c: _deep(5))),
    "deep nesting in header": (
        "approval_invalid",
        _std(lambda c: _with(c.good(), protected=b64url(b"[" * 3000 + b"]" * 3000))),
    ),
    "non-ASCII in approval": (
        "approval_invalid",
        _std(lambda c: c.good().replace(b'{"protected"', '{"x\u00e9":1,"protected"'.encode())),
    ),
    "UTF-8 BOM": ("approval_invalid", _std(lambda c: b"\xef\xbb\xbf" + c.good())),
    "not UTF-8": ("approval_invalid", _std(lambda c: b"\xff\xfe{}")),
    "garbage": ("approval_invalid", _std(lambda c: b"\x00garbage\x7f")),
    "empty": ("approval_invalid", _std(lambda c: b"")),
    "JSON list": ("approval_invalid", _std(lambda c: b"[]")),
    "JSON string": ("approval_invalid", _std(lambda c: b'"approval"')),
    "unknown JSON object": ("approval_invalid", _std(lambda c: b'{"hello": "world"}')),
    "compact JWS instead of JSON": (
        "approval_invalid",
        _std(
            lambda c: (
                _members(c.good())["protected"] + ".." + _members(c.good())["signature"]
            ).encode()
        ),
    ),
    "truncated": ("approval_invalid", _std(lambda c: c.good()[:-20])),
    "truncated to half": ("approval_invalid", _std(lambda c: c.good()[: len(c.good()) // 2])),
    "oversized": (
        "approval_invalid",
        _std(lambda c: c.good()[:-2] + b" " * MAX_APPROVAL_BYTES + b"}\n"),
    ),
    "payload member (attached JWS)": (
        "approval_invalid",
        _std(lambda c: _with(c.good(), payload=b64url(c.manifest))),
    ),
    "empty payload member": ("approval_invalid", _std(lambda c: _with(c.good(), payload=""))),
    "unprotected header member": (
        "approval_invalid",
        _std(lambda c: _with(c.good(), header={"kid": "alice"})),
    ),
    "general serialization": (
        "approval_invalid",
        _std(lambda c: json.dumps({"signatures": [_members(c.good())]}).encode()),
    ),
    "missing signature": ("approval_invalid", _std(lambda c: _with(c.good(), signature=None))),
    "signature not a string": ("approval_invalid", _std(lambda c: _with(c.good(), signature=12))),
    "padded base64url signature": (
        "approval_invalid",
        _std(lambda c: _with(c.good(), signature=_members(c.good())["signature"] + "==")),
    ),
    "base64 (not url) signature": (
        "approval_invalid",
        _std(
            lambda c: _with(
                c.good(), signature=base64.b64encode(b"\xfb\xff" * 32).decode().rstrip("=")
            )
        ),
    ),
    "non-canonical base64url signature (stray trailing bits)": (
        "approval_invalid",
        _std(lambda c: _with(c.good(), signature=_non_canonical(_members(c.good())["signature"]))),
    ),
    "ECDSA DER instead of raw": ("approval_invalid", _std(_der_signature)),
    "ECDSA signature too short": (
        "approval_invalid",
        _std(lambda c: _with(c.good(), signature=b64url(bytes(63)))),
    ),
    "ECDSA zero signature": (
        "approval_invalid",
        _std(lambda c: _with(c.good(), signature=b64url(bytes(64)))),
    ),
    "PS256 signature one byte short": (
        "approval_invalid",
        _std(
            lambda c: _with(
                c.good("PS256"),
                signature=b64url(b64url_decode(_members(c.good("PS256"))["signature"])[1:]),
            ),
            "PS256",
        ),
    ),
    "PS256 signature one byte long": (
        "approval_invalid",
        _std(
            lambda c: _with(
                c.good("PS256"),
                signature=b64url(b"\x00" + b64url_decode(_members(c.good("PS256"))["signature"])),
            ),
            "PS256",
        ),
    ),
}


@pytest.fixture(scope="module")
def ctx(pkg: Package, other_pkg: Package, signer_keys: dict[str, SignerKey]) -> Ctx:
    return Ctx(pkg, other_pkg, signer_keys)


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal(case: str, ctx: Ctx) -> None:
    reason, build = REFUSALS[case]
    data, manifest, approver, now = build(ctx)
    with pytest.raises(ApprovalError) as caught:
        verify_approval(data, manifest=manifest, approver=approver, now=now)
    assert type(caught.value) is ApprovalError
    assert caught.value.reason == reason, caught.value.message


def test_refusal_messages_are_specific(ctx: Ctx) -> None:
    with pytest.raises(ApprovalError, match="another package"):
        verify_approval(
            ctx.good(),
            manifest=ctx.other.manifest_bytes,
            approver=_approver(ctx.keys["ES256"]),
            now=NOW,
        )
    with pytest.raises(ApprovalError, match=r"64 bytes \(raw r\|\|s, not DER\)"):
        parse_approval(_der_signature(ctx))
    with pytest.raises(ApprovalError, match="nested too deeply"):
        parse_approval(_deep(5000))
    with pytest.raises(ApprovalError, match="duplicate"):
        parse_approval(ctx.good().replace(b'{"protected"', b'{"signature":"AA","protected"'))
    with pytest.raises(ApprovalError, match="16384-byte limit"):
        parse_approval(b" " * (MAX_APPROVAL_BYTES + 1))
    with pytest.raises(ApprovalError, match="'none' is not accepted"):
        parse_approval(
            _with(ctx.good(), protected=b64url(json.dumps(_header(ctx.pkg, "none")).encode()))
        )


def test_the_unmodified_cases_verify(ctx: Ctx) -> None:
    """The refusal cases start from approvals that do verify: the cases can fail."""
    for alg in ALGS:
        good = ctx.good(alg)
        assert (
            verify_approval(
                good, manifest=ctx.manifest, approver=_approver(ctx.keys[alg]), now=NOW
            ).alg
            == alg
        )
    forged = _forged(ctx)
    assert verify_approval(
        forged, manifest=ctx.manifest, approver=_approver(ctx.keys["ES256"]), now=NOW
    )


def test_naive_now_is_a_programming_error(ctx: Ctx) -> None:
    naive = datetime(2026, 6, 1)  # noqa: DTZ001  # the naive time is the point
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_approval(
            ctx.good(), manifest=ctx.manifest, approver=_approver(ctx.keys["ES256"]), now=naive
        )


# --- random mutations: only ApprovalError, ever --------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def byte_mutations(draw: st.DrawFn, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if not out:
            break
        pos = draw(st.integers(0, len(out) - 1))
        if kind == "flip":
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            out[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del out[pos : pos + draw(st.integers(1, 8))]
        else:
            del out[pos:]
    return bytes(out)


@st.composite
def json_mutations(draw: st.DrawFn, data: bytes) -> bytes:
    doc = json.loads(data)
    header = json.loads(b64url_decode(doc["protected"]))
    target = draw(
        st.sampled_from(
            ["header-value", "header-drop", "header-add", "member", "signature", "protected-raw"]
        )
    )
    if target == "header-value":
        header[draw(st.sampled_from(sorted(header)))] = draw(JSON_VALUES | st.sampled_from(
            ["ES256", "ES384", "EdDSA", "PS256", "none", "HS256", "alice", "2026-06-01T12:00:00Z"]))  # fmt: skip
    elif target == "header-drop":
        del header[draw(st.sampled_from(sorted(header)))]
    elif target == "header-add":
        header[draw(st.text(max_size=10))] = draw(JSON_VALUES)
    elif target == "member":
        doc[draw(st.sampled_from(["protected", "signature", "payload", "header", "x"]))] = draw(
            JSON_VALUES
        )
    elif target == "signature":
        doc["signature"] = b64url(draw(st.binary(max_size=600)))
    else:
        doc["protected"] = b64url(draw(st.binary(max_size=300)))
    if target.startswith("header"):
        doc["protected"] = b64url(json.dumps(header).encode())
    return json.dumps(doc).encode()


@pytest.fixture(scope="module")
def fuzz_base(ctx: Ctx) -> dict[str, bytes]:
    return {alg: ctx.good(alg) for alg in ALGS}


def _outcome(call: Callable[[], ApprovalClaims]) -> ApprovalClaims | ApprovalError:
    """The call's result, or the ApprovalError it raised; any other exception propagates."""
    try:
        return call()
    except ApprovalError as exc:
        return exc


def _only_approval_errors(data: bytes, ctx: Ctx, alg: str, original: bytes) -> None:
    approver = _approver(ctx.keys[alg])
    parsed = _outcome(lambda: parse_approval(data))
    if isinstance(parsed, ApprovalError):
        assert type(parsed) is ApprovalError
        assert parsed.reason == "approval_invalid"
    verified = _outcome(
        lambda: verify_approval(data, manifest=ctx.manifest, approver=approver, now=NOW)
    )
    if isinstance(verified, ApprovalError):
        assert type(verified) is ApprovalError
        assert verified.reason in {"approval_invalid", "approval_wrong_package", "approval_expired"}
    else:  # only layout changes outside the signed parts may survive
        assert verified == parse_approval(original)
        assert _members(data)["protected"] == _members(original)["protected"]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_byte_mutations_only_raise_approval_error(
    data: st.DataObject, ctx: Ctx, fuzz_base: dict[str, bytes]
) -> None:
    alg = data.draw(st.sampled_from(["ES256", "EdDSA"]))
    original = fuzz_base[alg]
    _only_approval_errors(data.draw(byte_mutations(original)), ctx, alg, original)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_json_mutations_only_raise_approval_error(
    data: st.DataObject, ctx: Ctx, fuzz_base: dict[str, bytes]
) -> None:
    alg = data.draw(st.sampled_from(ALGS))
    original = fuzz_base[alg]
    _only_approval_errors(data.draw(json_mutations(original)), ctx, alg, original)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=400))
def test_random_bytes_only_raise_approval_error(raw: bytes, ctx: Ctx) -> None:
    with pytest.raises(ApprovalError):
        verify_approval(raw, manifest=ctx.manifest, approver=_approver(ctx.keys["ES256"]), now=NOW)


@settings(max_examples=100, deadline=None)
@given(manifest=st.binary(max_size=200))
def test_random_manifest_bytes_only_raise_approval_error(
    manifest: bytes, ctx: Ctx, fuzz_base: dict[str, bytes]
) -> None:
    with pytest.raises(ApprovalError) as caught:
        verify_approval(
            fuzz_base["ES256"], manifest=manifest, approver=_approver(ctx.keys["ES256"]), now=NOW
        )
    assert caught.value.reason == "approval_invalid"


# --- approvers --------------------------------------------------------------------------------


def _entry(approver_id: Any, key: Any, **extra: Any) -> dict[str, Any]:
    return {"id": approver_id, "public_key_pem": public_pem(key), **extra}


def test_parse_approvers_all_key_types(signer_keys: dict[str, SignerKey]) -> None:
    doc = {
        "description": "payments custodians",
        "approvers": [_entry(f"a{i}", key) for i, key in enumerate(signer_keys.values())]
        + [
            _entry(
                "x.y@example-1",
                ec.generate_private_key(ec.SECP256R1()),
                expires="2027-01-31T23:59:59Z",
            )
        ],
    }
    approvers = parse_approvers(doc)
    assert list(approvers) == ["a0", "a1", "a2", "a3", "x.y@example-1"]
    for i, key in enumerate(signer_keys.values()):
        assert approvers[f"a{i}"].spki_sha256 == spki_sha256(key.public_key())
        assert approvers[f"a{i}"].expires is None
    assert approvers["x.y@example-1"].expires == datetime(2027, 1, 31, 23, 59, 59, tzinfo=UTC)
    assert "BEGIN" not in repr(approvers["a0"])


APPROVERS_REFUSALS: dict[str, tuple[Callable[[dict[str, SignerKey]], object], str]] = {
    "RSA-2048": (
        lambda k: {
            "approvers": [
                _entry("a", k["ES256"]),
                _entry("b", rsa.generate_private_key(65537, 2048)),
            ]
        },
        "approvers[1].public_key_pem: RSA-2048 is too small (>= 3072)",
    ),
    "P-521": (
        lambda k: {"approvers": [_entry("a", ec.generate_private_key(ec.SECP521R1()))]},
        "approvers[0].public_key_pem: EC curve secp521r1 is not accepted for approvals (P-256, P-384)",
    ),
    "secp256k1": (
        lambda k: {"approvers": [_entry("a", ec.generate_private_key(ec.SECP256K1()))]},
        "approvers[0].public_key_pem: EC curve secp256k1",
    ),
    "DSA": (
        lambda k: {"approvers": [_entry("a", dsa.generate_private_key(2048))]},
        "approvers[0].public_key_pem: DSAPublicKey keys are not accepted",
    ),
    "duplicate id": (
        lambda k: {"approvers": [_entry("a", k["ES256"]), _entry("a", k["EdDSA"])]},
        "approvers[1].id: 'a' is listed twice",
    ),
    "id twice in two cases": (
        lambda k: {"approvers": [_entry("alice", k["ES256"]), _entry("Alice", k["EdDSA"])]},
        "approvers[1].id: 'Alice' is listed twice (as 'alice')",
    ),
    "duplicate key": (
        lambda k: {"approvers": [_entry("a", k["ES256"]), _entry("b", k["ES256"])]},
        "approvers[1].public_key_pem: the same key as approver 'a'",
    ),
    "bad id": (
        lambda k: {"approvers": [_entry("-a", k["ES256"])]},
        "approvers[0].id: '-a' is not an approver id",
    ),
    "id with newline": (lambda k: {"approvers": [_entry("a\n", k["ES256"])]}, "approvers[0].id:"),
    "id not a string": (lambda k: {"approvers": [_entry(7, k["ES256"])]}, "approvers[0].id:"),
    "missing id": (
        lambda k: {"approvers": [{"public_key_pem": public_pem(k["ES256"])}]},
        "approvers[0].id: missing",
    ),
    "missing key": (lambda k: {"approvers": [{"id": "a"}]}, "approvers[0].public_key_pem: missing"),
    "private key PEM": (
        lambda k: {
            "approvers": [
                {
                    "id": "a",
                    "public_key_pem": k["ES256"]
                    .private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                    .decode(),
                }
            ]
        },
        "approvers[0].public_key_pem: holds a private key",
    ),
    "garbage PEM": (
        lambda k: {
            "approvers": [
                {
                    "id": "a",
                    "public_key_pem": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
                }
            ]
        },
        "approvers[0].public_key_pem: is not a valid PEM public key",
    ),
    "two PEM blocks": (
        lambda k: {
            "approvers": [
                {"id": "a", "public_key_pem": public_pem(k["ES256"]) + public_pem(k["EdDSA"])}
            ]
        },
        "approvers[0].public_key_pem: must hold exactly one",
    ),
    "PEM not a string": (
        lambda k: {"approvers": [{"id": "a", "public_key_pem": ["x"]}]},
        "approvers[0].public_key_pem: must be a PEM string",
    ),
    "bad expires": (
        lambda k: {"approvers": [_entry("a", k["ES256"], expires="2027-01-31")]},
        "approvers[0].expires: must be an RFC 3339",
    ),
    "unknown member": (
        lambda k: {"approvers": [_entry("a", k["ES256"], role="x")]},
        "approvers[0]: unknown member(s) 'role'",
    ),
    "entry not an object": (lambda k: {"approvers": ["alice"]}, "approvers[0]: must be an object"),
    "empty list": (lambda k: {"approvers": []}, "approvers: the list is empty"),
    "not a list": (lambda k: {"approvers": {"a": 1}}, "approvers: must be a list"),
    "missing approvers": (lambda k: {}, "approvers: must be a list"),
    "unknown top-level member": (
        lambda k: {"approvers": [], "policy": 1},
        "approvers document: unknown member(s) 'policy'",
    ),
    "not an object": (lambda k: [1], "approvers document: must be a JSON object"),
    "description not a string": (
        lambda k: {"approvers": [_entry("a", k["ES256"])], "description": 1},
        "description: must be a string",
    ),
}


@pytest.mark.parametrize("case", list(APPROVERS_REFUSALS))
def test_parse_approvers_refusals(case: str, signer_keys: dict[str, SignerKey]) -> None:
    build, message = APPROVERS_REFUSALS[case]
    with pytest.raises(ApprovalError) as caught:
        parse_approvers(build(signer_keys))
    assert caught.value.reason == "approvers_invalid"
    assert caught.value.message.startswith(message), caught.value.message


def test_load_approvers_is_strict(signer_keys: dict[str, SignerKey]) -> None:
    good = json.dumps({"approvers": [_entry("a", signer_keys["ES256"])]}).encode()
    assert list(load_approvers(good)) == ["a"]
    for bad in (
        b'{"approvers": [], "approvers": []}',
        b'{"approvers": ' + b"1" * 5000 + b"}",
        b"{",
        b"[" * 100 + b"]" * 100,
        b"\xff",
        b" " * (1024 * 1024 + 1),
    ):
        with pytest.raises(ApprovalError) as caught:
            load_approvers(bad)
        assert caught.value.reason == "approvers_invalid"


# --- signing refusals -------------------------------------------------------------------------


def test_sign_refusals(pkg: Package, signer_keys: dict[str, SignerKey]) -> None:
    signer = software_signer(signer_keys["ES256"])

    def sign(**kw: Any) -> bytes:
        args: dict[str, Any] = {"manifest": pkg.manifest_bytes, "approver_id": "alice", "key_name": KEY_NAME,
                                "not_after": NOT_AFTER, "signer": signer, "now": NOW, **kw}  # fmt: skip
        return sign_approval(**args)

    assert parse_approval(sign())
    for kw in ({"manifest": b"{}"}, {"manifest": b"garbage"}, {"manifest": pkg.byok.read_bytes()},
               {"not_after": NOW}, {"not_after": NOW - timedelta(days=1)},
               {"not_after": NOW + timedelta(microseconds=10)},
               {"approver_id": "-x"}, {"approver_id": "a b"}, {"key_name": "a.b"}, {"key_name": ""}):  # fmt: skip
        with pytest.raises(ApprovalError) as caught:
            sign(**kw)
        assert caught.value.reason == "approval_invalid", kw
    naive = datetime(2026, 6, 1)  # noqa: DTZ001  # the naive time is the point
    with pytest.raises(ValueError, match="timezone-aware"):
        sign(now=naive)


class _DerSigner:
    """A broken token driver: returns DER instead of r||s."""

    alg = "ES256"

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key
        self.spki_sha256 = spki_sha256(key.public_key())

    def sign(self, signing_input: bytes) -> bytes:
        return self._key.sign(signing_input, ec.ECDSA(hashes.SHA256()))


class _WrongKeySigner:
    """Claims one public key, signs with another."""

    alg = "ES256"

    def __init__(self, claimed: ec.EllipticCurvePrivateKey) -> None:
        self.public_key = claimed.public_key()
        self.spki_sha256 = spki_sha256(self.public_key)
        self._real = software_signer(ec.generate_private_key(ec.SECP256R1()))

    def sign(self, signing_input: bytes) -> bytes:
        return self._real.sign(signing_input)


def test_sign_refuses_misbehaving_signers(pkg: Package, signer_keys: dict[str, SignerKey]) -> None:
    key = signer_keys["ES256"]
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    for signer in (_DerSigner(key), _WrongKeySigner(key)):
        with pytest.raises(ApprovalError, match="signer"):
            sign_approval(manifest=pkg.manifest_bytes, approver_id="alice", key_name=KEY_NAME,
                          not_after=NOT_AFTER, signer=signer, now=NOW)  # fmt: skip


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (lambda: rsa.generate_private_key(65537, 2048), "RSA-2048 is too small"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), "secp521r1"),
        (lambda: dsa.generate_private_key(2048), "DSAPrivateKey"),
        (lambda: "not a key", "str"),
    ],
)
def test_software_signer_refuses_other_keys(key: Callable[[], object], message: str) -> None:
    with pytest.raises(SignerKeyError, match=message) as caught:
        software_signer(key())
    assert caught.value.reason == "bad_signer_key"


def test_signer_repr_hides_the_key(signer_keys: dict[str, SignerKey]) -> None:
    for key in signer_keys.values():
        signer = software_signer(key)
        text = repr(signer)
        assert "PRIVATE" not in text
        assert signer.spki_sha256 in text


# --- independent implementations: joserfc, the OpenSSL CLI -----------------------------------


def _joserfc_registry(alg: str) -> Any:
    """joserfc checks header members strictly: register ours (as strings)."""
    from joserfc.jws import JWSRegistry
    from joserfc.registry import HeaderParameter

    ours = ("byok_key_name", "byok_package_sha256", "byok_manifest_sha256", "byok_signed_at",
            "byok_not_after")  # fmt: skip
    return JWSRegistry(
        header_registry={name: HeaderParameter(name, "str", required=True) for name in ours},
        algorithms=[alg],
    )


def _joserfc_key(key: SignerKey, *, private: bool) -> Any:
    from joserfc.jwk import ECKey, OKPKey, RSAKey

    if private:
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    else:
        pem = public_pem(key).encode()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return ECKey.import_key(pem)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return OKPKey.import_key(pem)
    return RSAKey.import_key(pem)


@pytest.mark.filterwarnings("ignore::UserWarning")  # joserfc flags EdDSA as superseded (RFC 9864)
@pytest.mark.parametrize("alg", ALGS)
def test_joserfc_verifies_our_approvals(
    alg: str, pkg: Package, signer_keys: dict[str, SignerKey]
) -> None:
    from joserfc import jws
    from joserfc.errors import BadSignatureError

    key = signer_keys[alg]
    doc = json.loads(_sign(pkg, key))
    attached = {**doc, "payload": b64url(pkg.manifest_bytes)}  # RFC 7515 Appendix F: reattach
    result = jws.deserialize_json(
        cast("jws.FlattenedJSONSerialization", attached),
        _joserfc_key(key, private=False),
        registry=_joserfc_registry(alg),
    )
    assert result.payload == pkg.manifest_bytes
    assert result.headers()["kid"] == "alice"
    assert result.headers()["byok_package_sha256"] == pkg.sha256
    tampered = {**doc, "payload": b64url(pkg.manifest_bytes + b" ")}
    with pytest.raises(BadSignatureError):
        jws.deserialize_json(
            cast("jws.FlattenedJSONSerialization", tampered),
            _joserfc_key(key, private=False),
            registry=_joserfc_registry(alg),
        )


@pytest.mark.filterwarnings("ignore::UserWarning")  # joserfc flags EdDSA as superseded (RFC 9864)
@pytest.mark.parametrize("alg", ALGS)
def test_we_verify_joserfc_approvals(
    alg: str, pkg: Package, signer_keys: dict[str, SignerKey]
) -> None:
    from joserfc import jws

    key = signer_keys[alg]
    header = _header(pkg, alg)
    signed = jws.serialize_json(
        {"protected": header},
        pkg.manifest_bytes,
        _joserfc_key(key, private=True),
        registry=_joserfc_registry(alg),
    )
    detached = dict(jws.detach_content(signed))
    assert "payload" not in detached
    data = json.dumps(detached).encode()
    claims = verify_approval(data, manifest=pkg.manifest_bytes, approver=_approver(key), now=NOW)
    assert claims.alg == alg
    assert claims.approver_id == "alice"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.openssl
@pytest.mark.parametrize("alg", ALGS)
def test_signature_made_by_the_openssl_cli_verifies(
    alg: str, pkg: Package, signer_keys: dict[str, SignerKey], tmp_path: Path
) -> None:
    key = signer_keys[alg]
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
    protected = b64url(json.dumps(_header(pkg, alg), indent=1).encode())  # not canonical: fine
    (tmp_path / "input").write_bytes(approval_signing_input(protected, pkg.manifest_bytes))
    if alg == "EdDSA":
        _openssl(
            "pkeyutl",
            "-sign",
            "-inkey",
            "key.pem",
            "-rawin",
            "-in",
            "input",
            "-out",
            "sig",
            cwd=tmp_path,
        )
        signature = (tmp_path / "sig").read_bytes()
    elif alg == "PS256":
        _openssl("dgst", "-sha256", "-sign", "key.pem", "-sigopt", "rsa_padding_mode:pss",
                 "-sigopt", "rsa_pss_saltlen:32", "-out", "sig", "input", cwd=tmp_path)  # fmt: skip
        signature = (tmp_path / "sig").read_bytes()
    else:
        digest = "-sha256" if alg == "ES256" else "-sha384"
        _openssl("dgst", digest, "-sign", "key.pem", "-out", "sig.der", "input", cwd=tmp_path)
        size = 32 if alg == "ES256" else 48
        der = (tmp_path / "sig.der").read_bytes()
        signature = ecdsa_der_to_raw(der, size)
        r, s = decode_dss_signature(der)  # the hand conversion agrees with cryptography's parser
        assert signature == r.to_bytes(size, "big") + s.to_bytes(size, "big")
    data = json.dumps({"protected": protected, "signature": b64url(signature)}).encode()
    claims = verify_approval(data, manifest=pkg.manifest_bytes, approver=_approver(key), now=NOW)
    assert claims.alg == alg
    bad = json.dumps({"protected": protected, "signature": b64url(signature[::-1])}).encode()
    with pytest.raises(ApprovalError):
        verify_approval(bad, manifest=pkg.manifest_bytes, approver=_approver(key), now=NOW)


# --- the auditor's recipe in docs/approvals.md, verbatim --------------------------------------

RECIPE = "# auditor-recipe"


def test_the_readme_shows_the_tested_recipe() -> None:
    """The README's copy of the auditor's recipe is the block the tests below run."""
    readme = DOCS_APPROVALS.parent.parent / "README.md"
    assert doc_block(RECIPE, readme) == doc_block(RECIPE)


def _recipe_names(recipe: str) -> dict[str, str]:
    names = dict(re.findall(r"^(APPROVAL|MANIFEST|PACKAGE|PUBKEY)=(\S+)$", recipe, re.MULTILINE))
    assert set(names) == {"APPROVAL", "MANIFEST", "PACKAGE", "PUBKEY"}, names
    return names


def _audit_folder(
    tmp: Path, pkg: Package, approval: bytes, key: SignerKey, names: dict[str, str]
) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / names["APPROVAL"]).write_bytes(approval)
    shutil.copyfile(pkg.manifest, tmp / names["MANIFEST"])
    shutil.copyfile(pkg.byok, tmp / names["PACKAGE"])
    (tmp / names["PUBKEY"]).write_text(public_pem(key))
    return tmp


def _bash(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    bash = shutil.which("bash")
    assert bash is not None
    return subprocess.run(
        [bash, "-c", script], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )


@pytest.fixture(scope="module")
def recipe_pkg(
    keks: dict[int, rsa.RSAPrivateKey], tmp_path_factory: pytest.TempPathFactory
) -> Package:
    """A package named as in the recipe (the recipe's file names are the docs' example)."""
    name = _recipe_names(doc_block(RECIPE))["PACKAGE"].removesuffix(".byok")
    return _wrap(tmp_path_factory.mktemp("recipe"), name, keks[2048])


def _recipe_approval(pkg: Package, key: SignerKey, now: datetime = NOW) -> bytes:
    return sign_approval(manifest=pkg.manifest_bytes, approver_id="alice",
                         key_name=pkg.byok.name.removesuffix(".byok"), not_after=now + timedelta(days=7),
                         signer=software_signer(key), now=now)  # fmt: skip


@pytest.mark.openssl
def test_auditor_recipe_verifies_our_approvals(
    recipe_pkg: Package, signer_keys: dict[str, SignerKey], tmp_path: Path
) -> None:
    recipe = doc_block(RECIPE)
    names = _recipe_names(recipe)
    key = signer_keys["ES256"]
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    # signatures whose DER form differs in shape: a leading zero byte dropped, a sign byte added
    wanted: dict[str, Callable[[bytes], bool]] = {
        "r or s with a leading zero byte": lambda raw: raw[0] == 0 or raw[32] == 0,
        "r with its high bit set": lambda raw: raw[0] >= 0x80,
        "r with its high bit clear": lambda raw: raw[0] < 0x80,
    }
    picked: dict[str, bytes] = {}
    for i in range(3000):
        approval = _recipe_approval(recipe_pkg, key, NOW + timedelta(seconds=i))
        raw = b64url_decode(_members(approval)["signature"])
        for name, matches in wanted.items():
            if name not in picked and matches(raw):
                picked[name] = approval
        if len(picked) == len(wanted):
            break
    assert set(picked) == set(wanted)
    for i, approval in enumerate(picked.values()):
        folder = _audit_folder(tmp_path / str(i), recipe_pkg, approval, key, names)
        result = _bash(recipe, folder)
        assert result.returncode == 0, result.stderr
        assert "Verified OK" in result.stdout
        assert "manifest SHA-256 matches" in result.stdout


@pytest.mark.openssl
@pytest.mark.parametrize("tamper", ["signature", "header", "manifest", "package", "other key"])
def test_auditor_recipe_fails_on_tampering(
    tamper: str, recipe_pkg: Package, signer_keys: dict[str, SignerKey], tmp_path: Path
) -> None:
    recipe = doc_block(RECIPE)
    names = _recipe_names(recipe)
    key = signer_keys["ES256"]
    approval = _recipe_approval(recipe_pkg, key)
    folder = _audit_folder(tmp_path, recipe_pkg, approval, key, names)
    if tamper == "signature":
        (folder / names["APPROVAL"]).write_bytes(
            _with(approval, signature=_flip(_members(approval)["signature"], 40))
        )
    elif tamper == "header":
        header = json.loads(b64url_decode(_members(approval)["protected"]))
        header["byok_not_after"] = "2036-06-08T12:00:00Z"
        protected = b64url(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
        (folder / names["APPROVAL"]).write_bytes(_with(approval, protected=protected))
    elif tamper == "manifest":
        (folder / names["MANIFEST"]).write_bytes(
            recipe_pkg.manifest_bytes.replace(b'"sign"', b'"decrypt"')
        )
    elif tamper == "package":
        (folder / names["PACKAGE"]).write_bytes(recipe_pkg.byok.read_bytes() + b"\n")
    else:
        (folder / names["PUBKEY"]).write_text(public_pem(ec.generate_private_key(ec.SECP256R1())))
    result = _bash(recipe, folder)
    assert result.returncode != 0
    assert "Verified OK" not in result.stdout


@pytest.mark.openssl
@pytest.mark.parametrize(
    ("alg", "marker", "success"),
    [
        ("ES384", "# auditor-check-es384", "Verified OK"),
        ("EdDSA", "# auditor-check-eddsa", "Signature Verified Successfully"),
        ("PS256", "# auditor-check-ps256", "Verified OK"),
    ],
)
def test_auditor_checks_for_the_other_algorithms(
    alg: str,
    marker: str,
    success: str,
    recipe_pkg: Package,
    signer_keys: dict[str, SignerKey],
    tmp_path: Path,
) -> None:
    recipe = doc_block(RECIPE)
    common = recipe.split("# --- ES256 from here on ---")[0]
    names = _recipe_names(recipe)
    key = signer_keys[alg]
    script = common + doc_block(marker)
    good = _audit_folder(
        tmp_path / "good", recipe_pkg, _recipe_approval(recipe_pkg, key), key, names
    )
    result = _bash(script, good)
    assert result.returncode == 0, result.stderr
    assert success in result.stdout
    approval = _recipe_approval(recipe_pkg, key)
    bad = _audit_folder(
        tmp_path / "bad",
        recipe_pkg,
        _with(approval, signature=_flip(_members(approval)["signature"], 7)),
        key,
        names,
    )
    result = _bash(script, bad)
    assert result.returncode != 0
    assert success not in result.stdout


# --- the command line -------------------------------------------------------------------------


def _key_file(path: Path, key: SignerKey, passphrase: str | None = PASSPHRASE) -> Path:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode())
        if passphrase
        else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    return path


@pytest.fixture
def cli_pkg(keks: dict[int, rsa.RSAPrivateKey], tmp_path: Path) -> Package:
    return _wrap(tmp_path / "pkg", KEY_NAME, keks[2048])


def _approve(
    pkg: Package, key_file: Path, approver_id: str, *extra: str, now: datetime = NOW
) -> int:
    out = pkg.folder / f"{KEY_NAME}.approval-{approver_id}.json"
    argv = ["approve", str(pkg.manifest), "--approver-id", approver_id, "--signer-key", str(key_file),
            "--passphrase-env", "APPROVER_PASS", "--out", str(out), *extra]  # fmt: skip
    return main(argv, clock=lambda: now)


def test_cli_approve_prints_the_facts_and_writes_a_verifiable_approval(
    cli_pkg: Package, signer_keys: dict[str, SignerKey], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("APPROVER_PASS", PASSPHRASE)
    key = signer_keys["ES384"]
    key_file = _key_file(tmp_path / "alice.key.pem", key)
    assert _approve(cli_pkg, key_file, "alice") == 0
    captured = capsys.readouterr()
    manifest = json.loads(cli_pkg.manifest_bytes)
    out = captured.out
    for fact in (KEY_NAME, cli_pkg.sha256, manifest["target"]["type"], manifest["target"]["fingerprint"]["value"],
                 manifest["kek"]["kid"], manifest["kek"]["spki_sha256"], ",".join(manifest["target"]["key_ops"]),
                 "2026-06-08T12:00:00Z", spki_sha256(key.public_key()),
                 hashlib.sha256(cli_pkg.manifest_bytes).hexdigest(), "matches the package file"):  # fmt: skip
        assert fact in out, fact
    assert out.index(KEY_NAME) < out.index("signer:")  # the facts come before the signing
    assert captured.err == ""
    approval = (cli_pkg.folder / f"{KEY_NAME}.approval-alice.json").read_bytes()
    claims = verify_approval(
        approval, manifest=cli_pkg.manifest_bytes, approver=_approver(key), now=NOW
    )
    assert (claims.key_name, claims.alg, claims.not_after) == (
        KEY_NAME,
        "ES384",
        NOW + timedelta(days=7),
    )
    # no secret anywhere
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for blob in (out.encode(), captured.err.encode(), approval):
        assert PASSPHRASE.encode() not in blob
        assert der[-32:].hex().encode() not in blob
        assert b"PRIVATE" not in blob
    assert not list(cli_pkg.folder.glob(".*.tmp"))


def test_cli_approve_json_and_validity_options(
    cli_pkg: Package, signer_keys: dict[str, SignerKey], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("APPROVER_PASS", PASSPHRASE)
    key_file = _key_file(tmp_path / "k.pem", signer_keys["EdDSA"])
    assert _approve(cli_pkg, key_file, "alice", "--valid-days", "2", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "ok"
    assert result["not_after"] == "2026-06-03T12:00:00Z"
    assert result["signed_at"] == "2026-06-01T12:00:00Z"
    assert result["alg"] == "EdDSA"
    assert result["key_name"] == KEY_NAME
    assert result["package_sha256"] == cli_pkg.sha256
    assert result["signer_spki_sha256"] == spki_sha256(signer_keys["EdDSA"].public_key())
    assert result["package_checked"] is True
    plain = _key_file(tmp_path / "rsa.pem", signer_keys["PS256"], passphrase=None)
    assert _approve(cli_pkg, plain, "bob", "--not-after", "2026-06-01T13:00:00Z",
                    "--key-name", "other-name", "--json") == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert (result["not_after"], result["key_name"], result["alg"]) == (
        "2026-06-01T13:00:00Z",
        "other-name",
        "PS256",
    )


def test_cli_inspect_lists_and_verifies_approvals(
    cli_pkg: Package, signer_keys: dict[str, SignerKey], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("APPROVER_PASS", PASSPHRASE)
    alice, bob, carol = signer_keys["ES256"], signer_keys["EdDSA"], signer_keys["PS256"]
    for name, key in (("alice", alice), ("bob", bob)):
        assert _approve(cli_pkg, _key_file(tmp_path / f"{name}.pem", key), name) == 0
    approvers = tmp_path / "approvers.json"
    approvers.write_text(
        json.dumps(
            {"approvers": [_entry("alice", alice), _entry("bob", bob), _entry("carol", carol)]}
        )
    )
    capsys.readouterr()

    assert main(["inspect", str(cli_pkg.byok)], clock=lambda: NOW) == 0
    out = capsys.readouterr().out
    assert "2 found, not verified" in out
    assert f"alice approves key {KEY_NAME}" in out

    assert (
        main(
            ["inspect", str(cli_pkg.byok), "--approvers", str(approvers), "--json"],
            clock=lambda: NOW,
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["valid"]
    assert report["approved_by"] == ["alice", "bob"]
    assert [a["status"] for a in report["approvals"]] == ["valid", "valid"]
    assert report["approvals"][0]["claims"]["byok_package_sha256"] == cli_pkg.sha256

    assert (
        main(["inspect", str(cli_pkg.byok), "--approvers", str(approvers)], clock=lambda: NOW) == 0
    )
    assert "2 valid (alice, bob)" in capsys.readouterr().out

    # later: bob's approval expired (7 days); a carol approval for another key name; a broken one
    carol_key = _key_file(tmp_path / "carol.pem", carol)
    assert _approve(cli_pkg, carol_key, "carol", "--key-name", "other", "--valid-days", "30") == 0
    (cli_pkg.folder / f"{KEY_NAME}.approval-mallory.json").write_text("{}")
    capsys.readouterr()
    rc = main(["inspect", str(cli_pkg.byok), "--approvers", str(approvers), "--json"],
              clock=lambda: NOW + timedelta(days=8))  # fmt: skip
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert rc == 2
    by_file = {Path(a["file"]).name.split(".approval-")[1]: a for a in report["approvals"]}
    assert by_file["alice.json"]["reason"] == "approval_expired"
    assert by_file["carol.json"]["reason"] == "approval_wrong_package"
    assert by_file["mallory.json"]["reason"] == "approval_invalid"
    assert report["approved_by"] == []
    assert "invalid [approval_expired]" in captured.err

    # without --approvers a malformed approval is a finding too
    assert main(["inspect", str(cli_pkg.byok), "--json"], clock=lambda: NOW) == 2
    capsys.readouterr()


def test_cli_inspect_unknown_approver(
    cli_pkg: Package, signer_keys: dict[str, SignerKey], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("APPROVER_PASS", PASSPHRASE)
    assert _approve(cli_pkg, _key_file(tmp_path / "d.pem", signer_keys["ES256"]), "dave") == 0
    approvers = tmp_path / "approvers.json"
    approvers.write_text(json.dumps({"approvers": [_entry("alice", signer_keys["ES256"])]}))
    capsys.readouterr()
    assert (
        main(["inspect", str(cli_pkg.byok), "--approvers", str(approvers)], clock=lambda: NOW) == 2
    )
    captured = capsys.readouterr()
    assert (
        "refused [approval_unknown_approver]: approver 'dave' is not in the approvers file"
        in captured.out
    )


def _one_refusal(capsys: pytest.CaptureFixture[str], rc: int, reason: str) -> str:
    captured = capsys.readouterr()
    assert rc == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"byok-package: refused [{reason}]: "), lines[0]
    assert "Traceback" not in captured.err
    return lines[0]


CLI_REFUSALS: dict[str, tuple[str, Callable[[Package, Path, dict[str, SignerKey]], list[str]]]] = {
    "bad manifest": ("bad_manifest", lambda p, t, k: ["--manifest-bytes", "{}"]),
    "manifest with a 5000-digit integer": (
        "malformed_package",
        lambda p, t, k: ["--manifest-bytes", '{"a": ' + "1" * 5000 + "}"],
    ),
    "manifest not JSON": ("malformed_package", lambda p, t, k: ["--manifest-bytes", "nope"]),
    "missing manifest": (
        "unreadable_input",
        lambda p, t, k: ["--manifest-path", str(t / "none.json")],
    ),
    "package beside differs": ("approval_wrong_package", lambda p, t, k: ["--package-bytes", "{}"]),
    "past not-after": ("bad_arguments", lambda p, t, k: ["--not-after", "2026-06-01T11:59:59Z"]),
    "bad not-after": ("bad_arguments", lambda p, t, k: ["--not-after", "tomorrow"]),
    "valid-days 0": ("bad_arguments", lambda p, t, k: ["--valid-days", "0"]),
    "valid-days too many": ("bad_arguments", lambda p, t, k: ["--valid-days", "367"]),
    "bad approver id": ("bad_arguments", lambda p, t, k: ["--approver-id", "al ice"]),
    "bad key name": ("bad_key_name", lambda p, t, k: ["--key-name", "a_b"]),
    "RSA-2048 signer": (
        "bad_signer_key",
        lambda p, t, k: [
            "--signer-key",
            str(_key_file(t / "r.pem", rsa.generate_private_key(65537, 2048), None)),
        ],
    ),
    "P-521 signer": (
        "bad_signer_key",
        lambda p, t, k: [
            "--signer-key",
            str(_key_file(t / "e.pem", ec.generate_private_key(ec.SECP521R1()), None)),
        ],
    ),
    "public key as signer": (
        "bad_signer_key",
        lambda p, t, k: ["--signer-key", str(_write(t / "p.pem", public_pem(k["ES256"]).encode()))],
    ),
    "garbage signer key": (
        "bad_signer_key",
        lambda p, t, k: ["--signer-key", str(_write(t / "g", b"\x00garbage"))],
    ),
    "missing signer key": (
        "unreadable_input",
        lambda p, t, k: ["--signer-key", str(t / "none.pem")],
    ),
    "wrong passphrase": ("bad_passphrase", lambda p, t, k: ["--passphrase-env", "WRONG_PASS"]),
    "unset passphrase variable": (
        "bad_passphrase",
        lambda p, t, k: ["--passphrase-env", "UNSET_VARIABLE_FOR_TEST"],
    ),
    "no signer": ("bad_arguments", lambda p, t, k: ["--no-signer"]),
    "software and token signer": (
        "bad_arguments",
        lambda p, t, k: [
            "--pkcs11-module",
            "/nonexistent.so",
            "--token-label",
            "t",
            "--key-label",
            "k",
        ],
    ),
    "token signer without labels": (
        "bad_arguments",
        lambda p, t, k: ["--no-signer", "--pkcs11-module", "/nonexistent.so"],
    ),
    "token labels without module": ("bad_arguments", lambda p, t, k: ["--token-label", "t"]),
    "missing PKCS#11 module": (
        "pkcs11_module_load",
        lambda p, t, k: [
            "--no-signer",
            "--pkcs11-module",
            str(t / "none.so"),
            "--token-label",
            "t",
            "--key-label",
            "k",
        ],
    ),
    "output exists": ("output_exists", lambda p, t, k: ["--out-exists"]),
    "output folder missing": (
        "output_unwritable",
        lambda p, t, k: ["--out", str(t / "no" / "x.json")],
    ),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(CLI_REFUSALS))
def test_cli_approve_refusals(
    case: str, cli_pkg: Package, signer_keys: dict[str, SignerKey], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("APPROVER_PASS", PASSPHRASE)
    monkeypatch.setenv("WRONG_PASS", "wrong")
    monkeypatch.delenv("UNSET_VARIABLE_FOR_TEST", raising=False)
    reason, build = CLI_REFUSALS[case]
    extra = build(cli_pkg, tmp_path, signer_keys)
    opts: dict[str, str | None] = {
        "--approver-id": "alice",
        "--signer-key": str(_key_file(tmp_path / "alice.pem", signer_keys["ES256"])),
        "--passphrase-env": "APPROVER_PASS",
        "--out": str(cli_pkg.folder / f"{KEY_NAME}.approval-alice.json"),
    }
    manifest = str(cli_pkg.manifest)
    before: bytes | None = None
    flags: list[str] = []
    i = 0
    while i < len(extra):
        flag = extra[i]
        if flag == "--manifest-bytes":
            cli_pkg.manifest.write_text(extra[i + 1])
            i += 2
        elif flag == "--manifest-path":
            manifest = extra[i + 1]
            i += 2
        elif flag == "--package-bytes":
            cli_pkg.byok.write_text(extra[i + 1])
            i += 2
        elif flag == "--no-signer":
            opts["--signer-key"] = opts["--passphrase-env"] = None
            i += 1
        elif flag == "--out-exists":
            before = b"existing approval"
            Path(str(opts["--out"])).write_bytes(before)
            i += 1
        elif flag in opts and flag not in {"--pkcs11-module", "--token-label", "--key-label"}:
            opts[flag] = extra[i + 1]
            i += 2
        else:
            flags.append(flag)
            i += 1
    argv = ["approve", manifest]
    for flag, value in opts.items():
        if value is not None:
            argv += [flag, value]
    argv += flags
    files_before = sorted(p.name for p in cli_pkg.folder.iterdir())
    line = _one_refusal(capsys, main(argv, clock=lambda: NOW), reason)
    assert PASSPHRASE not in line
    assert sorted(p.name for p in cli_pkg.folder.iterdir()) == files_before  # nothing written
    if before is not None:
        assert Path(str(opts["--out"])).read_bytes() == before


def test_cli_approve_refuses_in_json_too(
    cli_pkg: Package, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["approve", str(cli_pkg.manifest), "--approver-id", "alice", "--out",
               str(tmp_path / "x.json"), "--json"], clock=lambda: NOW)  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 2
    assert json.loads(captured.out) == {
        "status": "refused", "reason": "bad_arguments",
        "message": "give --signer-key FILE or a token (--pkcs11-module ...)",
    }  # fmt: skip


def test_cli_inspect_refusals(
    cli_pkg: Package, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _write(
        tmp_path / "approvers.json", b'{"approvers": [{"id": "a", "public_key_pem": "x"}]}'
    )
    line = _one_refusal(
        capsys, main(["inspect", str(cli_pkg.byok), "--approvers", str(bad)]), "approvers_invalid"
    )
    assert "approvers[0].public_key_pem" in line
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copyfile(cli_pkg.byok, lone / cli_pkg.byok.name)
    good = _write(
        tmp_path / "ok.json",
        json.dumps({"approvers": [_entry("a", ec.generate_private_key(ec.SECP256R1()))]}).encode(),
    )
    _one_refusal(
        capsys,
        main(["inspect", str(lone / cli_pkg.byok.name), "--approvers", str(good)]),
        "bad_arguments",
    )


def test_cli_help_explains(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["approve", "--help"])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    for phrase in (
        "detached",
        "--signer-key",
        "--pkcs11-module",
        "--valid-days",
        "docs/approvals.md",
        "dual control",
        "never replaces",
    ):
        assert phrase in text, phrase
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    assert "--approvers" in capsys.readouterr().out


def test_load_signer_key_forms(signer_keys: dict[str, SignerKey]) -> None:
    key = signer_keys["ES256"]
    spki = spki_sha256(key.public_key())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    enc = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.BestAvailableEncryption(b"pw"))  # fmt: skip
    assert load_signer_key(pem).spki_sha256 == spki
    assert load_signer_key(der).spki_sha256 == spki
    assert load_signer_key(enc, passphrase=lambda: b"pw").spki_sha256 == spki
    for data, passphrase, reason in ((enc, None, "bad_passphrase"), (enc, lambda: b"no", "bad_passphrase"),
                                     (b"junk", None, "bad_signer_key")):  # fmt: skip
        with pytest.raises(ByokError) as caught:
            load_signer_key(data, passphrase=passphrase)
        assert caught.value.reason == reason


def test_verify_uses_the_signature_not_just_the_hashes(ctx: Ctx) -> None:
    """A forged approval over the right hashes, signed by another key, is refused."""
    mallory = ec.generate_private_key(ec.SECP256R1())
    forged = _forge(ctx.manifest, _header(ctx.pkg, "ES256"), mallory)
    with pytest.raises(ApprovalError) as caught:
        verify_approval(
            forged, manifest=ctx.manifest, approver=_approver(ctx.keys["ES256"]), now=NOW
        )
    assert caught.value.reason == "approval_invalid"
    # and PS256 with the right parameters only: PKCS#1 v1.5 over the same input is refused
    key = ctx.keys["PS256"]
    assert isinstance(key, rsa.RSAPrivateKey)
    protected = b64url(json.dumps(_header(ctx.pkg, "PS256")).encode())
    v15 = key.sign(
        approval_signing_input(protected, ctx.manifest), padding.PKCS1v15(), hashes.SHA256()
    )
    data = json.dumps({"protected": protected, "signature": b64url(v15)}).encode()
    with pytest.raises(ApprovalError):
        verify_approval(data, manifest=ctx.manifest, approver=_approver(key), now=NOW)


def test_cli_inspect_refuses_an_approval_of_another_package(
    cli_pkg: Package, other_pkg: Package, signer_keys: dict[str, SignerKey], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    key = signer_keys["ES256"]
    approval = sign_approval(manifest=other_pkg.manifest_bytes, approver_id="alice", key_name=KEY_NAME,
                             not_after=NOT_AFTER, signer=software_signer(key), now=NOW)  # fmt: skip
    (cli_pkg.folder / f"{KEY_NAME}.approval-alice.json").write_bytes(approval)
    approvers = _write(
        tmp_path / "a.json", json.dumps({"approvers": [_entry("alice", key)]}).encode()
    )
    rc = main(
        ["inspect", str(cli_pkg.byok), "--approvers", str(approvers), "--json"], clock=lambda: NOW
    )
    report = json.loads(capsys.readouterr().out)
    assert rc == 2
    assert report["approvals"][0]["reason"] == "approval_wrong_package"
    assert "another package" in report["approvals"][0]["message"]


APPROVER_DOCS = JSON_VALUES | st.fixed_dictionaries(
    {
        "approvers": st.lists(
            st.dictionaries(
                st.sampled_from(["id", "public_key_pem", "expires", "x"]),
                JSON_VALUES
                | st.sampled_from(
                    ["alice", "-----BEGIN PUBLIC KEY-----\nAA==\n", "2027-01-01T00:00:00Z"]
                ),
            ),
            max_size=3,
        )
    }
)


@settings(max_examples=200, deadline=None)
@given(doc=APPROVER_DOCS)
def test_parse_approvers_only_raises_approval_error(doc: object) -> None:
    try:
        approvers = parse_approvers(doc)
    except ApprovalError as exc:
        caught: ApprovalError | None = exc
    else:
        caught = None
        assert approvers
    if caught is not None:
        assert type(caught) is ApprovalError
        assert caught.reason == "approvers_invalid"
