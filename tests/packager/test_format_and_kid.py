"""The .byok reader/writer and the kid parser."""

from __future__ import annotations

import json

import pytest
from testsupport import SHARED_VECTORS, VENDOR_SAMPLE

from offline_packager.errors import ByokError
from offline_packager.kid import parse_kid
from offline_packager.package_format import (
    b64url_decode,
    b64url_encode,
    encode_package,
    parse_package,
)

KID = "https://contoso.managedhsm.azure.net/keys/KEK-1/" + "ab" * 16


def test_vendor_sample_copy_matches_shared() -> None:
    shared = SHARED_VECTORS / VENDOR_SAMPLE.name
    if shared.exists():
        assert shared.read_bytes() == VENDOR_SAMPLE.read_bytes()
    assert len(VENDOR_SAMPLE.read_bytes()) > 3000


def test_vendor_sample_parses() -> None:
    pkg = parse_package(VENDOR_SAMPLE.read_bytes())
    assert pkg.kid.endswith("/keys/KekForByokR4k/083cf1b67d314d15b1fa46915cde3217")
    assert len(pkg.ciphertext) == 2896
    assert pkg.generator is not None
    assert pkg.generator.startswith("Primus Java BYOK-Tool")


def test_encode_is_azure_format_and_round_trips() -> None:
    ct = bytes(range(256)) + bytes(40)
    raw = encode_package(KID, ct, "byok-package test")
    doc = json.loads(raw)
    assert doc == {
        "schema_version": "1.0.0",
        "header": {"kid": KID, "alg": "dir", "enc": "CKM_RSA_AES_KEY_WRAP"},
        "ciphertext": doc["ciphertext"],
        "generator": "byok-package test",
    }
    assert "=" not in doc["ciphertext"]
    assert "+" not in doc["ciphertext"]
    assert "/" not in doc["ciphertext"]
    assert parse_package(raw).ciphertext == ct


def test_crlf_pretty_printed_and_padded_are_accepted() -> None:
    ct = bytes(range(1, 6))
    padded = b64url_encode(ct) + "=" * (-len(b64url_encode(ct)) % 4)
    assert padded.endswith("=")
    text = json.dumps(
        {
            "schema_version": "1.0.0",
            "header": {"kid": KID, "alg": "dir", "enc": "CKM_RSA_AES_KEY_WRAP"},
            "ciphertext": padded,
        },
        indent=2,
    ).replace("\n", "\r\n")
    assert parse_package(("\ufeff" + text + "\r\n").encode()).ciphertext == ct


def _doc(**overrides: object) -> bytes:
    doc: dict[str, object] = {
        "schema_version": "1.0.0",
        "header": {"kid": KID, "alg": "dir", "enc": "CKM_RSA_AES_KEY_WRAP"},
        "ciphertext": "AAAA",
        "generator": "x",
    }
    doc.update(overrides)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "malformed_package"),
        (b"\xff\xfe", "malformed_package"),
        (b"[1]", "malformed_package"),
        (b'{"a":1,"a":2}', "malformed_package"),
        (b'{"x": NaN}', "malformed_package"),
        (_doc(schema_version="2.0.0"), "unsupported_schema_version"),
        (_doc(header={"kid": KID, "alg": "RSA-OAEP", "enc": "CKM_RSA_AES_KEY_WRAP"}), "wrong_alg"),
        (_doc(header={"kid": KID, "alg": "dir", "enc": "A256GCM"}), "wrong_enc"),
        (_doc(header={"kid": KID, "alg": "dir"}), "malformed_package"),
        (_doc(header={"kid": 5, "alg": "dir", "enc": "CKM_RSA_AES_KEY_WRAP"}), "bad_kid"),
        (_doc(ciphertext="AA+A"), "bad_base64"),
        (_doc(ciphertext="A"), "bad_base64"),
        (_doc(ciphertext="AA="), "bad_base64"),
        (_doc(ciphertext=""), "malformed_package"),
        (_doc(extra=1), "malformed_package"),
        (b"[" * 60000, "malformed_package"),
        (b" " * 70000, "too_large"),
    ],
)
def test_malformed_packages_are_refused_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ByokError) as err:
        parse_package(data)
    assert err.value.reason == reason


def test_b64url_accepts_both_paddings() -> None:
    for n in range(10):
        data = bytes(range(n))
        enc = b64url_encode(data)
        assert b64url_decode(enc) == data
        assert b64url_decode(enc + "=" * (-len(enc) % 4)) == data


def test_kid_parses_with_port_and_case() -> None:
    kid = parse_kid("https://127.0.0.1:8443/keys/k/" + "0" * 32)
    assert (kid.host, kid.name, kid.version) == ("127.0.0.1:8443", "k", "0" * 32)
    assert kid.vault_url == "https://127.0.0.1:8443"
    assert parse_kid(KID, expected_host="CONTOSO.managedhsm.azure.net").name == "KEK-1"


@pytest.mark.parametrize(
    ("kid", "reason"),
    [
        ("https://contoso.managedhsm.azure.net/keys/kek", "bad_kid"),
        ("https://contoso.managedhsm.azure.net/keys/kek/", "bad_kid"),
        ("http://contoso.managedhsm.azure.net/keys/kek/" + "a" * 32, "bad_kid"),
        ("https://contoso.managedhsm.azure.net/keys/kek/" + "A" * 32, "bad_kid"),
        ("https://contoso.managedhsm.azure.net/keys/kek/" + "a" * 31, "bad_kid"),
        ("https://contoso.managedhsm.azure.net/secrets/kek/" + "a" * 32, "bad_kid"),
        ("https://contoso.managedhsm.azure.net/keys/k_e_k/" + "a" * 32, "bad_kid"),
        ("https://contoso.managedhsm.azure.net/keys/kek/" + "a" * 32 + "?x=1", "bad_kid"),
        ("https://user@contoso.managedhsm.azure.net/keys/kek/" + "a" * 32, "bad_kid"),
        ("https://bad_host/keys/kek/" + "a" * 32, "bad_kid"),
        ("", "bad_kid"),
    ],
)
def test_bad_kids_are_refused(kid: str, reason: str) -> None:
    with pytest.raises(ByokError) as err:
        parse_kid(kid)
    assert err.value.reason == reason


def test_kid_of_another_hsm_is_refused() -> None:
    with pytest.raises(ByokError) as err:
        parse_kid(KID, expected_host="fabrikam.managedhsm.azure.net")
    assert err.value.reason == "kid_wrong_hsm"
