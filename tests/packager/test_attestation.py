"""KEK attestation, offline: each check refuses a crafted bad case; the pinned Marvell roots
are the published ones; the CLI records the result in the manifest; no azure.* is needed."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from testsupport import REPO, write_ec_key

from managed_hsm_emulator.attestation import (
    ROOT_CN,
    TEST_ORG,
    TEST_SUBTREE,
    AttestationPki,
    attestation_object,
    issue,
    key_objects,
    sign_blob,
    signed_data,
)
from offline_packager import attestation as att
from offline_packager.attestation import (
    TrustAnchor,
    load_test_root,
    pinned_roots,
    verify_kek_attestation,
)
from offline_packager.cli import main
from offline_packager.errors import AttestationError
from offline_packager.kek import Kek, check_kek
from offline_packager.kid import parse_kid
from offline_packager.package_format import b64url_encode

NOW = dt.datetime.now(dt.UTC)
KID = "https://contoso.managedhsm.azure.net/keys/kek1/" + "ab" * 16
SCHEMA = json.loads((REPO / "offline_packager" / "schemas" / "manifest.schema.json").read_text())


def _name(org: str, cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(x509.NameOID.COMMON_NAME, cn),
        ]
    )


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class Pki:
    """A TEST PKI with every private key kept, so tests can mis-issue on purpose."""

    root_key: rsa.RSAPrivateKey
    card_key: rsa.RSAPrivateKey
    partition_key: rsa.RSAPrivateKey
    owner_key: rsa.RSAPrivateKey
    certs: AttestationPki

    @property
    def anchor(self) -> TrustAnchor:
        return load_test_root(self.certs.root.public_bytes(serialization.Encoding.PEM))


def make_pki(*, now: dt.datetime = NOW, card_org: str = TEST_ORG) -> Pki:
    keys = [_key() for _ in range(4)]
    root_key, card_key, partition_key, owner_key = keys
    root_name = _name("managed-hsm-emulator TEST partition owner", ROOT_CN)
    root = issue(root_name, root_key.public_key(), root_name, root_key, now=now, ca=True,
                 constraints=x509.NameConstraints([x509.DirectoryName(TEST_SUBTREE)], None))  # fmt: skip
    card_name = _name(card_org, "TEST card")
    card = issue(card_name, card_key.public_key(), root_name, root_key, now=now, ca=True)
    partition = issue(_name(card_org, "TEST partition"), partition_key.public_key(), card_name,
                      card_key, now=now, ca=False)  # fmt: skip
    owner_name = _name("owner", "TEST owner root")
    owner_root = issue(owner_name, owner_key.public_key(), owner_name, owner_key, now=now, ca=True)
    owner_partition = issue(_name("owner", "TEST owner partition"), partition_key.public_key(),
                            owner_name, owner_key, now=now, ca=False)  # fmt: skip
    certs = AttestationPki(root, card, partition, owner_root, owner_partition, partition_key)
    return Pki(root_key, card_key, partition_key, owner_key, certs)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@pytest.fixture(scope="module")
def kek_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


@pytest.fixture(scope="module")
def kek(kek_key: rsa.RSAPrivateKey) -> Kek:
    return check_kek(kek_key.public_key())


def _objects(public: rsa.RSAPublicKey, **overrides: Any) -> list[dict[int, bytes]]:
    args: dict[str, Any] = {
        "family": "RSA",
        "kid": KID,
        "key_ops": ["import"],
        "rsa_public": public.public_numbers(),
        "local": True,
        "extractable": False,
    }
    args.update(overrides)
    return key_objects(**args)


def document(
    pki: Pki,
    public: rsa.RSAPublicKey,
    *,
    blob: bytes | None = None,
    certificates: list[x509.Certificate] | None = None,
    key_ops: list[str] | None = None,
    version: str = "MRVL-1",
    **object_overrides: Any,
) -> bytes:
    """An attestation file as Managed HSM answers it (the emulator's shape)."""
    if blob is None:
        blob = sign_blob(_objects(public, **object_overrides), pki.partition_key)
    attestation = attestation_object(certificates or pki.certs.bundle(), blob)
    attestation["version"] = version
    numbers = public.public_numbers()
    key = {
        "kid": KID,
        "kty": "RSA-HSM",
        "key_ops": key_ops or ["import"],
        "n": b64url_encode(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
        "e": b64url_encode(numbers.e.to_bytes(3, "big")),
    }
    return json.dumps(
        {"key": key, "attributes": {"enabled": True, "attestation": attestation}}
    ).encode()


def verify(data: bytes, kek: Kek, pki: Pki, **kwargs: Any) -> att.AttestationResult:
    kwargs.setdefault("anchors", [*pinned_roots(require_all=False), pki.anchor])
    kwargs.setdefault("kek_kid", parse_kid(KID))
    return verify_kek_attestation(data, kek, now=NOW, **kwargs)


def refused(reason: str, call: Callable[[], object]) -> AttestationError:
    with pytest.raises(AttestationError) as info:
        call()
    assert info.value.reason == reason, info.value.message
    return info.value


# -- the good case ---------------------------------------------------------------------------------
def test_a_genuine_attestation_verifies_and_says_what_it_proved(
    pki: Pki, kek: Kek, kek_key: rsa.RSAPrivateKey
) -> None:
    data = document(pki, kek_key.public_key())
    result = verify(data, kek, pki)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.trust_anchor == "test-root"
    assert result.trust_anchor_sha256 == pki.anchor.sha256
    assert result.attested_key_id == KID
    assert result.kek_spki_sha256 == kek.fingerprint
    assert result.attributes["extractable"] is False
    assert result.attributes["local"] is True
    assert result.attributes["never_extractable"] is True
    assert result.attributes["unwrap"] is True
    assert result.attributes["sign"] is False
    doc = result.to_manifest()
    assert doc["result"] == "verified"
    kek_schema = SCHEMA["properties"]["kek"]["properties"]["attestation"]
    jsonschema.validate(doc, kek_schema)


# -- the chain -------------------------------------------------------------------------------------
def test_without_the_test_root_only_marvell_is_trusted(
    pki: Pki, kek: Kek, kek_key: rsa.RSAPrivateKey
) -> None:
    data = document(pki, kek_key.public_key())
    err = refused("attestation_chain_invalid", lambda: verify(data, kek, pki, anchors=None))
    installed = pinned_roots(require_all=False)
    if len(installed) == len(att.PINNED_ROOTS):  # chained to neither Marvell root
        assert "marvell-ls1, marvell-ls2" in err.message
    else:  # the Marvell roots are not installed: nothing can be trusted, and it says so
        assert "is not installed" in err.message


def test_wrong_root_is_refused(pki: Pki, kek: Kek, kek_key: rsa.RSAPrivateKey) -> None:
    other = make_pki()
    data = document(pki, kek_key.public_key())
    refused("attestation_chain_invalid", lambda: verify(data, kek, pki, anchors=[other.anchor]))


def test_re_signed_leaf_is_refused(pki: Pki, kek: Kek, kek_key: rsa.RSAPrivateKey) -> None:
    """An attacker's partition certificate: same names, their own key and signature."""
    attacker = _key()
    forged = issue(pki.certs.partition.subject, attacker.public_key(), pki.certs.card.subject,
                   attacker, now=NOW, ca=False)  # fmt: skip
    owner = issue(pki.certs.owner_partition.subject, attacker.public_key(),
                  pki.certs.owner_root.subject, pki.owner_key, now=NOW, ca=False)  # fmt: skip
    blob = sign_blob(_objects(kek_key.public_key()), attacker)
    certs = [forged, pki.certs.card, owner, pki.certs.owner_root]
    data = document(pki, kek_key.public_key(), blob=blob, certificates=certs)
    refused("attestation_chain_invalid", lambda: verify(data, kek, pki))


def test_partition_owner_must_vouch_for_the_same_key(
    pki: Pki, kek: Kek, kek_key: rsa.RSAPrivateKey
) -> None:
    other_key = _key()
    owner = issue(pki.certs.owner_partition.subject, other_key.public_key(),
                  pki.certs.owner_root.subject, pki.owner_key, now=NOW, ca=False)  # fmt: skip
    for certs in (
        [pki.certs.partition, pki.certs.card],  # no owner chain at all
        [pki.certs.partition, pki.certs.card, owner, pki.certs.owner_root],  # another key
    ):
        data = document(pki, kek_key.public_key(), certificates=certs)
        refused("attestation_chain_invalid", partial(verify, data, kek, pki))


def test_expired_or_not_yet_valid_chain_is_refused(
    pki: Pki, kek: Kek, kek_key: rsa.RSAPrivateKey
) -> None:
    data = document(pki, kek_key.public_key())
    for when in (NOW + dt.timedelta(days=3651), NOW - dt.timedelta(days=1)):
        refused(
            "attestation_chain_invalid",
            partial(
                verify_kek_attestation,
                data,
                kek,
                now=when,
                anchors=[pki.anchor],
                kek_kid=parse_kid(KID),
            ),
        )


def test_the_test_roots_name_constraints_are_enforced(kek: Kek, kek_key: rsa.RSAPrivateKey) -> None:
    outside = make_pki(card_org="Marvell")  # issued by the TEST root, outside its subtree
    data = document(outside, kek_key.public_key())
    refused("attestation_chain_invalid", lambda: verify(data, kek, outside))


def test_a_test_root_must_look_like_one(pki: Pki) -> None:
    for root in pinned_roots(require_all=False):
        pem = root.certificate.public_bytes(serialization.Encoding.PEM)
        refused("attestation_chain_invalid", partial(load_test_root, pem))
    refused("attestation_chain_invalid", lambda: load_test_root(b"not a certificate"))
    card_pem = pki.certs.card.public_bytes(serialization.Encoding.PEM)
    refused("attestation_chain_invalid", lambda: load_test_root(card_pem))


# -- the signature ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "where", [20, 100, -300, -1]
)  # header, attributes, last data byte, signature
def test_flipped_byte_in_the_blob_is_refused(
    where: int, pki: Pki, kek: Kek, kek_key: rsa.RSAPrivateKey
) -> None:
    blob = bytearray(sign_blob(_objects(kek_key.public_key()), pki.partition_key))
    blob[where] ^= 0x01
    data = document(pki, kek_key.public_key(), blob=bytes(blob))
    refused("attestation_signature_invalid", lambda: verify(data, kek, pki))


def test_firmware_2x_raw_signature_is_recognised_and_refused(
    pki: Pki, kek: Kek, kek_key: rsa.RSAPrivateKey
) -> None:
    data = signed_data(_objects(kek_key.public_key()), signature_size=256)
    digest = hashlib.sha256(data).digest()
    n = pki.partition_key.public_key().public_numbers().n
    d = pki.partition_key.private_numbers().d
    raw = pow(int.from_bytes(b"\x00\x01" + b"\xff" * 222 + digest, "big"), d, n).to_bytes(
        256, "big"
    )
    doc = document(pki, kek_key.public_key(), blob=data + raw)
    err = refused("attestation_format_unsupported", lambda: verify(doc, kek, pki))
    assert "2.x" in err.message


# -- the key and its attributes --------------------------------------------------------------------
def test_other_keys_attestation_is_refused(pki: Pki, kek: Kek) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    data = document(pki, other.public_key())
    refused("attestation_key_mismatch", lambda: verify(data, kek, pki))
    # the unsigned key bundle claiming the KEK does not help: the signed modulus decides
    blob = sign_blob(_objects(other.public_key()), pki.partition_key)
    data = document(pki, kek.public_key, blob=blob)
    refused("attestation_key_mismatch", lambda: verify(data, kek, pki))


def test_attestation_for_another_kid_or_operations_is_refused(
    pki: Pki, kek: Kek, kek_key: rsa.RSAPrivateKey
) -> None:
    data = document(pki, kek_key.public_key())
    other_kid = parse_kid(KID[:-1] + "c")
    refused("attestation_key_mismatch", lambda: verify(data, kek, pki, kek_kid=other_kid))
    broad = document(pki, kek_key.public_key(), key_ops=["import", "decrypt"])
    refused("attestation_key_mismatch", lambda: verify(broad, kek, pki))


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"extractable": True}, "extractable"),
        ({"local": False}, "not generated inside the HSM"),
    ],
)
def test_extractable_or_imported_key_is_refused(
    overrides: dict[str, Any], words: str, pki: Pki, kek: Kek, kek_key: rsa.RSAPrivateKey
) -> None:
    data = document(pki, kek_key.public_key(), **overrides)
    err = refused("attestation_key_extractable", lambda: verify(data, kek, pki))
    assert words in err.message


def test_never_extractable_false_is_refused(pki: Pki, kek: Kek, kek_key: rsa.RSAPrivateKey) -> None:
    objects = _objects(kek_key.public_key())
    objects[1][att.ATTR_NEVER_EXTRACTABLE] = b"\x00"
    data = document(pki, kek_key.public_key(), blob=sign_blob(objects, pki.partition_key))
    refused("attestation_key_extractable", lambda: verify(data, kek, pki))


def _without(kind: int) -> Callable[[list[dict[int, bytes]]], None]:
    def edit(objects: list[dict[int, bytes]]) -> None:
        for o in objects:
            o.pop(kind, None)

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        _without(att.ATTR_MODULUS),  # nothing binds the attestation to a key
        _without(att.ATTR_EXTRACTABLE),
        _without(att.ATTR_LOCAL),
        lambda objects: objects[1].__setitem__(att.ATTR_EXTRACTABLE, b"\x02"),  # not a boolean
        lambda objects: objects[1].__setitem__(att.ATTR_CLASS, b"\x02"),  # no private object
    ],
)
def test_attributes_it_does_not_understand_are_refused(
    edit: Callable[[list[dict[int, bytes]]], None], pki: Pki, kek: Kek, kek_key: rsa.RSAPrivateKey
) -> None:
    objects = _objects(kek_key.public_key())
    edit(objects)
    data = document(pki, kek_key.public_key(), blob=sign_blob(objects, pki.partition_key))
    refused("attestation_format_unsupported", lambda: verify(data, kek, pki))


def _signed(data: bytes, pki: Pki) -> bytes:
    return data + pki.partition_key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def test_layouts_that_do_not_fit_are_refused(
    pki: Pki, kek: Kek, kek_key: rsa.RSAPrivateKey
) -> None:
    good = signed_data(_objects(kek_key.public_key()), signature_size=256)
    wrong_total = good[:8] + (len(good) + 999).to_bytes(4, "big") + good[12:]
    huge_buffer = good[:12] + (10**6).to_bytes(4, "big") + good[16:]
    bad_offsets = good[:16] + b"\x00\x01\x00\x00\x00\x00\x00\x00" + good[24:]
    for data in (wrong_total, huge_buffer, bad_offsets, good[:40]):
        doc = document(pki, kek_key.public_key(), blob=_signed(data, pki))
        refused("attestation_format_unsupported", partial(verify, doc, kek, pki))


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d.replace(b'"MRVL-1"', b'"MRVL-2"'),
        lambda d: b"[]",
        lambda d: b"{not json",
        lambda d: d.replace(b'"privateKeyAttestation": "', b'"privateKeyAttestation": "*'),
        lambda d: json.dumps({"attestation": {"version": "MRVL-1"}}).encode(),
    ],
)
def test_files_it_does_not_understand_are_refused(
    mangle: Callable[[bytes], bytes], pki: Pki, kek: Kek, kek_key: rsa.RSAPrivateKey
) -> None:
    data = mangle(document(pki, kek_key.public_key()))
    refused("attestation_format_unsupported", lambda: verify(data, kek, pki))


# -- the pinned roots ------------------------------------------------------------------------------
def test_vendor_roots_not_installed_or_altered_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pki: Pki
) -> None:
    """The Marvell certificates are not in the repository (they are installed by the
    custodian): a missing one is refused with where to get it and its pin; any other
    certificate under its name is refused as altered."""
    monkeypatch.setenv("BYOK_VENDOR_ROOTS", str(tmp_path))
    with pytest.raises(AttestationError) as missing:
        pinned_roots()
    assert missing.value.reason == "attestation_chain_invalid"
    assert "marvell.com" in missing.value.message
    assert att.PINNED_ROOTS["marvell-ls1"][1] in missing.value.message
    assert pinned_roots(require_all=False) == ()
    (tmp_path / att.PINNED_ROOTS["marvell-ls1"][0]).write_bytes(
        pki.anchor.certificate.public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(AttestationError, match="altered"):
        pinned_roots(require_all=False)


def test_pinned_marvell_roots_parse_and_match_their_sha256() -> None:
    if not all((att.roots_dir() / f).is_file() for f, _ in att.PINNED_ROOTS.values()):
        pytest.skip("the Marvell root certificates are not installed (see offline_packager/roots)")
    roots = {r.label: r for r in pinned_roots()}
    assert set(roots) == {"marvell-ls1", "marvell-ls2"}
    readme = (REPO / "offline_packager" / "roots" / "README.md").read_text()
    expected = {
        "marvell-ls1": ("localca.liquidsecurity.cavium.com", 2048, "2024-07-25", "2034-07-23"),
        "marvell-ls2": ("cavium-liquidsecurity-ls2", 4096, "2024-07-22", "2034-07-20"),
    }
    for label, (file_name, pinned) in att.PINNED_ROOTS.items():
        pem = (att.roots_dir() / file_name).read_text()
        body = pem.split("-----BEGIN CERTIFICATE-----\n")[1].split("-----END CERTIFICATE-----")[0]
        der = base64.b64decode(body)  # independent of cryptography's parser
        assert hashlib.sha256(der).hexdigest() == pinned == roots[label].sha256
        assert pinned in readme
        cert = roots[label].certificate
        cn, bits, start, end = expected[label]
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == cn
        assert cert.subject == cert.issuer
        public = cert.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        assert public.key_size == bits
        cert.verify_directly_issued_by(cert)  # self-signed signature holds
        assert cert.not_valid_before_utc.date().isoformat() == start
        assert cert.not_valid_after_utc.date().isoformat() == end


@pytest.mark.openssl
def test_pinned_roots_agree_with_the_openssl_cli() -> None:
    if not all((att.roots_dir() / f).is_file() for f, _ in att.PINNED_ROOTS.values()):
        pytest.skip("the Marvell root certificates are not installed (see offline_packager/roots)")
    for file_name, pinned in att.PINNED_ROOTS.values():
        path = att.roots_dir() / file_name
        out = subprocess.run(["openssl", "x509", "-in", str(path), "-noout", "-fingerprint",
                              "-sha256"], check=True, capture_output=True, text=True).stdout  # fmt: skip
        assert out.strip().split("=", 1)[1].replace(":", "").lower() == pinned


def test_an_altered_pinned_root_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    label, (file_name, _) = next(iter(att.PINNED_ROOTS.items()))
    monkeypatch.setitem(att.PINNED_ROOTS, label, (file_name, "00" * 32))
    refused("attestation_chain_invalid", pinned_roots)


# -- the command line ------------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path: Path, pki: Pki, kek_key: rsa.RSAPrivateKey) -> dict[str, Path]:
    kek_pem = tmp_path / "kek.pem"
    kek_pem.write_bytes(
        kek_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    attestation = tmp_path / "kek.attestation.json"
    attestation.write_bytes(document(pki, kek_key.public_key()))
    root = tmp_path / "test-root.pem"
    root.write_bytes(pki.certs.root.public_bytes(serialization.Encoding.PEM))
    return {"kek": kek_pem, "attestation": attestation, "root": root, "dir": tmp_path}


def test_verify_command_needs_the_test_root_for_a_test_attestation(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["verify-kek-attestation", str(files["attestation"]), "--kek", str(files["kek"]),
            "--kek-kid", KID]  # fmt: skip
    assert main(base) == 2
    assert "refused [attestation_chain_invalid]" in capsys.readouterr().err
    assert main([*base, "--trust-test-root", str(files["root"]), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["status"] == "verified"
    assert result["trust_anchor"] == "test-root"
    assert "TEST root" in captured.err
    assert main([*base, "--trust-test-root", str(files["root"])]) == 0
    assert "result: VERIFIED" in capsys.readouterr().out


def test_wrap_records_the_attestation_in_the_manifest(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = files["dir"] / "k.byok"
    wrap = ["wrap", "--kek", str(files["kek"]), "--kek-kid", KID, "--generate", "oct-256",
            "--out", str(out), "--kek-attestation", str(files["attestation"])]  # fmt: skip
    assert main(wrap) == 2  # the emulator's TEST root is not trusted by default
    assert not out.exists()
    assert main([*wrap, "--trust-test-root", str(files["root"])]) == 0
    assert "KEK attestation verified" in capsys.readouterr().out
    manifest = json.loads((files["dir"] / "k.manifest.json").read_text())
    jsonschema.validate(manifest, SCHEMA, format_checker=jsonschema.FormatChecker())
    recorded = manifest["kek"]["attestation"]
    assert recorded["sha256"] == hashlib.sha256(files["attestation"].read_bytes()).hexdigest()
    assert recorded["result"] == "verified"
    # inspect verifies it again and checks it is the one the manifest records
    inspect = ["inspect", str(out), "--kek", str(files["kek"])]
    assert main([*inspect, "--kek-attestation", str(files["attestation"]),
                 "--trust-test-root", str(files["root"]), "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["kek_attestation"]["status"] == "verified"
    assert main(inspect) == 0
    assert "KEK attest.:  recorded" in capsys.readouterr().out
    other = files["dir"] / "other.json"
    other.write_bytes(files["attestation"].read_bytes() + b"\n")  # same content, other bytes
    assert main([*inspect, "--kek-attestation", str(other), "--trust-test-root",
                 str(files["root"])]) == 2  # fmt: skip
    assert "invalid [manifest_mismatch]" in capsys.readouterr().err
    assert main([*inspect, "--kek-attestation", str(other)]) == 2
    assert "invalid [attestation_chain_invalid]" in capsys.readouterr().err


def test_wrap_batch_checks_the_attestation_once_and_records_it_in_every_manifest(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = files["dir"] / "batch"
    out.mkdir()
    batch = ["wrap-batch", "--kek", str(files["kek"]), "--kek-kid", KID, "--generate", "oct-256:2",
             "--generate", "ec-p256:1", "--out-dir", str(out), "--kek-attestation",
             str(files["attestation"]), "--json"]  # fmt: skip
    assert main(batch) == 2  # refused as a whole: the TEST root is not trusted by default
    assert json.loads(capsys.readouterr().out)["reason"] == "attestation_chain_invalid"
    assert list(out.iterdir()) == []
    assert main([*batch, "--trust-test-root", str(files["root"])]) == 0
    summary = json.loads(capsys.readouterr().out)
    digest = hashlib.sha256(files["attestation"].read_bytes()).hexdigest()
    assert summary["kek_attestation"]["sha256"] == digest
    for entry in summary["keys"]:
        manifest = json.loads(Path(entry["manifest"]).read_text())
        assert manifest["kek"]["attestation"] == summary["kek_attestation"]


def test_wrap_without_attestation_records_none(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["wrap", "--kek", str(files["kek"]), "--kek-kid", KID, "--generate", "oct-128",
                 "--out", str(files["dir"] / "w.byok")]) == 0  # fmt: skip
    manifest = json.loads((files["dir"] / "w.manifest.json").read_text())
    assert "attestation" not in manifest["kek"]
    capsys.readouterr()
    assert main(["approve", str(files["dir"] / "w.manifest.json"), "--approver-id", "bob",
                 "--signer-key", str(_signer(files["dir"])), "--out",
                 str(files["dir"] / "w.approval-bob.json")]) == 0  # fmt: skip
    assert "KEK attestation:   none" in capsys.readouterr().out
    assert main(["wrap", "--kek", str(files["kek"]), "--kek-kid", KID, "--generate", "oct-128",
                 "--out", str(files["dir"] / "x.byok"), "--trust-test-root",
                 str(files["root"])]) == 2  # fmt: skip
    assert "refused [bad_arguments]" in capsys.readouterr().err


def _signer(folder: Path) -> Path:
    return write_ec_key(folder / "signer.pem")


def test_approver_sees_the_attestation(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = files["dir"] / "a.byok"
    assert main(["wrap", "--kek", str(files["kek"]), "--kek-kid", KID, "--generate", "oct-256",
                 "--out", str(out), "--kek-attestation", str(files["attestation"]),
                 "--trust-test-root", str(files["root"])]) == 0  # fmt: skip
    signer = _signer(files["dir"])
    capsys.readouterr()
    assert main(["approve", str(files["dir"] / "a.manifest.json"), "--approver-id", "alice",
                 "--signer-key", str(signer), "--out", str(files["dir"] / "a.approval-alice.json")]) == 0  # fmt: skip
    assert "KEK attestation:   verified at wrap time, chain to test-root" in capsys.readouterr().out


def test_standalone_verifier_imports_no_azure(files: dict[str, Path]) -> None:
    code = (
        "import sys\n"
        "from offline_packager.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "bad = sorted(m for m in sys.modules if m == 'azure' or m.startswith('azure.'))\n"
        "print('EXIT:%d AZURE:%s' % (code, ','.join(bad)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "verify-kek-attestation", str(files["attestation"]),
         "--kek", str(files["kek"]), "--trust-test-root", str(files["root"])],
        check=True, capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert "EXIT:0 AZURE:\n" in out.stdout


def test_attestation_reasons_are_documented() -> None:
    readme = (REPO / "README.md").read_text()
    doc = (REPO / "docs" / "kek-attestation.md").read_text()
    for reason in att.REASONS:
        assert f"`{reason}`" in readme, reason
        assert f"`{reason}`" in doc, reason
