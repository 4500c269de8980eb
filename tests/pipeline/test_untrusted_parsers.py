"""Every parser of untrusted input returns a typed value or raises its domain refusal.

The parsers: package bytes (``load_json_strict``, ``parse_package``, ``b64url_decode``,
``read_package``, ``check_package``), the kid (``parse_kid``), the blob name (``key_name_of``),
upload metadata (``parse_metadata``, ``parse_tags``, ``parse_fingerprint``,
``options_from_manifest``) and the Event Grid subject (``BlobCreatedEvent.parse``). Each is walked
with hostile inputs; whatever escapes other than its refusal fails the test. The guard itself
(``offline_packager.guard.refuses``) is shown to turn a bug into the refusal, logged once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest

from byok_pipeline.core.errors import Rejected
from byok_pipeline.core.events import BlobCreatedEvent, EventError
from byok_pipeline.core.metadata import (
    options_from_manifest,
    parse_fingerprint,
    parse_metadata,
    parse_tags,
)
from byok_pipeline.core.reasons import REASONS
from byok_pipeline.core.settings import Settings
from byok_pipeline.core.validation import read_package
from byok_pipeline.processing.processor import key_name_of
from offline_packager.checks import check_package
from offline_packager.errors import ByokError, KidError, PackageFormatError
from offline_packager.guard import refuses
from offline_packager.kid import parse_kid
from offline_packager.package_format import b64url_decode, load_json_strict, parse_package

HOST = "h.managedhsm.example"
KID = f"https://{HOST}/keys/kek/{'a' * 32}"
GOOD = (
    '{"schema_version":"1.0.0","header":{"kid":"' + KID + '","alg":"dir",'
    '"enc":"CKM_RSA_AES_KEY_WRAP"},"ciphertext":"AAAA","generator":"t"}'
)
SPOILED_KIDS = [  # JSON escapes: a tab and a newline in the kid's string value
    GOOD.replace("/kek/", "/k\\tek/").encode(), GOOD.replace(HOST, "[" + HOST).encode(),
    GOOD.replace(HOST, HOST + "\uff03x").encode(), GOOD.replace(KID, KID + "\\n").encode(),
]  # fmt: skip

HOSTILE_TEXT: list[Any] = [
    "", " ", "\n", "\x00", "\ufeff", "\ud800", "x" * 100_000, "9" * 5000, "[" * 5000,
    '{"a":' * 3000, "\uff03", "\u2100", "[", "https://[", "https://h]/", "\t", "\r\n",
    "null", "NaN", "-Infinity", "1e999999", '"\\ud800"', "{}", "[]", '{"a":1,"a":2}',
    f'{{"a":{"9" * 5000}}}', None, 0, 10**5000 if False else 10**100, [], {}, b"bytes", 1.5,
]  # fmt: skip
HOSTILE_BYTES: list[bytes] = [
    b"", b"\xff\xfe", b"\xef\xbb\xbf", b"\x00" * 10, b"{" * 5000, b"[" * 100_000,
    GOOD.replace('"AAAA"', "9" * 5000).encode(), GOOD[:-1].encode() + b',"x":' + b"9" * 5000 + b"}",
    GOOD.replace("AAAA", "AAAA==\n").encode(), *SPOILED_KIDS, GOOD.encode("utf-16"),
    GOOD.replace('"dir"', '"d\xe9r"').encode("latin-1"), GOOD.encode() + b"\x00",
    GOOD.replace('"t"', "[" * 3000 + "]" * 3000).encode(), GOOD.replace('"t"', "1e999").encode(),
]  # fmt: skip
SETTINGS = Settings(hsm_url=f"https://{HOST}")


def _accepted(
    parser: Callable[[Any], Any], inputs: list[Any], refusal: type[ByokError]
) -> list[Any]:
    """Call ``parser`` on each input: a value or ``refusal`` with a known reason, nothing else
    (anything else fails the test). Returns the inputs it accepted."""
    accepted, reasons = [], []
    for value in inputs:
        try:
            parser(value)
        except refusal as exc:
            reasons.append(exc.reason)
        else:
            accepted.append(value)
    assert set(reasons) <= set(REASONS), parser
    return accepted


def test_package_parsers_refuse_with_their_reason() -> None:
    texts = [v for v in HOSTILE_TEXT if isinstance(v, str)]
    encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
    not_strict_json = [
        b"", b"\xff\xfe", b"[" * 100_000, b"9" * 5000, b'{"a":' + b"9" * 5000 + b"}", b"NaN",
        b"1e999999", b'{"a":1,"a":2}', GOOD.encode("utf-16"), GOOD.encode() + b"\x00",
        GOOD.replace('"dir"', '"d\xe9r"').encode("latin-1"), GOOD.replace('"t"', "1e999").encode(),
    ]  # fmt: skip
    assert _accepted(load_json_strict, not_strict_json, PackageFormatError) == []
    assert load_json_strict(b"\xef\xbb\xbf" + GOOD.encode())["generator"] == "t"  # BOM is fine
    # parse_package leaves the kid to parse_kid (read_package runs both)
    assert _accepted(parse_package, HOSTILE_BYTES + encoded, PackageFormatError) == SPOILED_KIDS
    assert _accepted(lambda b: read_package(b, SETTINGS), HOSTILE_BYTES + encoded, Rejected) == []
    alphabet_only = ["", "x" * 100_000, "9" * 5000, "null", "NaN", "1e999999"]
    assert _accepted(b64url_decode, HOSTILE_TEXT, PackageFormatError) == alphabet_only
    for data in HOSTILE_BYTES:  # never raises: every problem is a finding
        report = check_package(data, expected_host=HOST)
        assert report.findings
        assert all(f.reason in REASONS for f in report.findings)


def test_kid_parser_refuses_bad_kid() -> None:
    spoiled = [KID.replace("/kek/", f"/k{c}ek/") for c in ("\t", "\n", "\r", "\x00", " ", "\x7f")]
    kids = [*HOSTILE_TEXT, *spoiled, KID + "\n", "https://[::1/keys/k/" + "a" * 32,
            f"https://{HOST}\uff03/keys/k/{'a' * 32}", f"https://{HOST}:99999/keys/k/{'a' * 32}"]  # fmt: skip
    assert _accepted(parse_kid, kids, KidError) == []  # not one of them is a kid
    assert parse_kid(KID).kid == KID


def test_blob_name_parser_refuses_bad_key_name() -> None:
    names = [*HOSTILE_TEXT, "x.byok\n", "x\n.byok", "x\r.byok", "x.byok ", ".byok", "x.BYOK",
             "a/b.byok", "x" * 128 + ".byok", "ключ.byok", "x\x00.byok", "x.byok\x00"]  # fmt: skip
    assert _accepted(key_name_of, names, Rejected) == []
    assert key_name_of("x" * 127 + ".byok") == "x" * 127


def test_metadata_parsers_refuse_bad_metadata() -> None:
    assert _accepted(parse_tags, HOSTILE_TEXT, Rejected) == ["{}"]
    assert _accepted(parse_fingerprint, [*HOSTILE_TEXT, "kcv:ABCDEF\n"], Rejected) == []
    metas: list[Any] = [
        *({"byok_tags": t} for t in HOSTILE_TEXT),
        *({"byok_target_type": t} for t in HOSTILE_TEXT),
        *({"byok_key_ops": t} for t in HOSTILE_TEXT),
        *({"byok_fingerprint": t} for t in HOSTILE_TEXT),
        *({"byok_package_sha256": t} for t in HOSTILE_TEXT),
        None, [], "x", {1: 2}, {"byok_key_ops": "encrypt\n"},
    ]  # fmt: skip
    assert _accepted(parse_metadata, metas, Rejected) == [{"byok_tags": "{}"}]
    manifests: list[Any] = [None, [], "x", {"target": []}, {"target": {"fingerprint": 1}},
                            {"package": "x"}, {"target": {"type": ["rsa-2048"]}}]  # fmt: skip
    assert _accepted(options_from_manifest, manifests, Rejected) == []


@pytest.mark.parametrize(
    "name", ["byok-package-sha256", "byok-package-id", "byok-kek-kid", "BYOK-Package-Id"]
)
def test_the_pipelines_own_tags_are_refused_from_an_uploader(name: str) -> None:
    """The tags that find an imported version again (exactly-once, take-over) come from the
    pipeline only: ``byok import --tag byok-package-id=...`` could plant another package's
    identity (review finding: that one was not reserved)."""
    with pytest.raises(Rejected, match="reserved for the pipeline") as refused:
        parse_tags(json.dumps({name: "0" * 64}))
    assert refused.value.reason == "bad_metadata"


def test_event_subject_keeps_a_trailing_newline() -> None:
    event = {
        "eventType": "Microsoft.Storage.BlobCreated",
        "subject": "/blobServices/default/containers/in/blobs/x.byok\n",
    }
    assert BlobCreatedEvent.parse(event).blob_name == "x.byok\n"
    with pytest.raises(EventError):
        BlobCreatedEvent.parse({"eventType": "Microsoft.Storage.BlobCreated", "subject": "/x"})


def test_an_unexpected_exception_in_a_parser_is_its_refusal_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @refuses(KidError)
    def buggy(text: str) -> str:
        return str(1 // len(text))  # ZeroDivisionError on "" (a bug, not a refusal)

    with caplog.at_level(logging.WARNING, logger="byok.untrusted"), pytest.raises(KidError) as exc:
        buggy("")
    assert exc.value.reason == "bad_kid"
    assert "ZeroDivisionError" in exc.value.message
    assert len([r for r in caplog.records if r.name == "byok.untrusted"]) == 1
    assert buggy("x") == "1"
