"""The mutation campaign (``make fuzz``; a fixed-seed sample runs in ``make test``).

Valid packages of every target type, wrapped under KEKs of every size, are mutated at every
level an attacker or a careless uploader reaches: the JSON document, the kid, the base64url
text, bits of the RSA block and of the AES-KWP block, truncation and extension, the blob name
and the upload metadata. Each mutant goes through the pipeline's own checks in their documented
order, and those that pass are imported into the emulator's service (in process). A share of
them also goes through the whole pipeline against Azurite and the emulator over HTTPS
(:func:`run_pipeline_share`). The emulator's request path gets mutated request bodies too.

What must stay at zero: unhandled exceptions, packages imported (a mutant is either refused or
the same package as its seed, then a ``duplicate``), untyped refusals (a reason outside
:data:`byok_pipeline.core.reasons.REASONS`, an emulator 500) and retries caused by input (a
``TransientError`` out of the checks of an input). Every input that ever failed is kept as a
regression case in ``tests/pipeline/test_mutation_campaign.py``.

Key material: the campaign generates its own throw-away target keys and never prints them, the
ciphertext or the packages; a failure is reported by mutation kind, seed type and a digest.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cryptography.hazmat.primitives.asymmetric import rsa

from byok_pipeline.core.errors import Rejected, TransientError
from byok_pipeline.core.identity import package_id
from byok_pipeline.core.kek_facts import KekFacts
from byok_pipeline.core.metadata import (
    META_FINGERPRINT,
    META_KEY_OPS,
    META_MANIFEST_SHA256,
    META_PACKAGE_SHA256,
    META_TAGS,
    META_TARGET_TYPE,
    ImportOptions,
)
from byok_pipeline.core.reasons import REASONS
from byok_pipeline.core.settings import Settings
from byok_pipeline.core.validation import read_package
from byok_pipeline.processing.processor import check_drop
from offline_packager.errors import ByokError
from offline_packager.keytypes import TARGET_TYPES, TYPE_NAMES
from offline_packager.kid import KeyId
from offline_packager.package_format import b64url_decode, b64url_encode, encode_package
from offline_packager.target_keys import generate_target
from offline_packager.wrap import wrap_target

if TYPE_CHECKING:  # the emulator is imported lazily, by the campaign only
    from managed_hsm_emulator.service import KeyVaultService

KEK_SIZES = (2048, 3072, 4096)
HOST = "fuzz.managedhsm.example:443"
_HUGE = "9" * 5000
_ODD_CHARS = [
    "\n",
    "\r",
    "\t",
    "\x00",
    "\x7f",
    " ",
    "[",
    "]",
    "@",
    "#",
    "?",
    "%",
    "\\",
    "/",
    "\u00e9",
    "\uff03",
    "\u2100",
    "\u200b",
    "\ufeff",
    "\ud800",
    "=",
    "+",
    ".",
    ":",
]


@dataclass(frozen=True)
class Seed:
    """A valid package: what the mutants start from."""

    type_name: str
    kek_bits: int
    blob_name: str
    data: bytes
    metadata: dict[str, str]
    kid: str
    identity: str

    def __repr__(self) -> str:
        return f"Seed({self.type_name} under RSA-{self.kek_bits}, {self.blob_name})"


@dataclass(frozen=True)
class Mutant:
    """One hostile input: a drop (blob name, bytes, metadata)."""

    kind: str
    seed: Seed
    blob_name: str
    data: bytes
    metadata: dict[str, str]

    def digest(self) -> str:
        h = hashlib.sha256(self.blob_name.encode("utf-8", "surrogatepass") + b"\0" + self.data)
        h.update(json.dumps(self.metadata, sort_keys=True).encode("utf-8", "surrogatepass"))
        return h.hexdigest()[:16]


@dataclass
class Tally:
    """The campaign's figures."""

    inputs: int = 0
    unhandled: int = 0
    imported: int = 0
    untyped: int = 0
    retries: int = 0
    duplicates: int = 0
    accepted_by_checks: int = 0  # passed every check, then refused by the HSM's unwrap
    reasons: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return self.unhandled + self.imported + self.untyped + self.retries

    def fail(self, counter: str, mutant: Mutant, what: str) -> None:
        setattr(self, counter, getattr(self, counter) + 1)
        if len(self.failures) < 50:
            self.failures.append(
                f"{counter}: {mutant.kind} of {mutant.seed!r} [{mutant.digest()}]: {what}"
            )

    def merge(self, other: Tally) -> None:
        for name in (
            "inputs",
            "unhandled",
            "imported",
            "untyped",
            "retries",
            "duplicates",
            "accepted_by_checks",
            "seconds",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.reasons.update(other.reasons)
        self.failures.extend(other.failures[: max(0, 50 - len(self.failures))])

    def summary(self) -> dict[str, Any]:
        rate = self.inputs / self.seconds if self.seconds else 0.0
        return {
            "inputs": self.inputs,
            "unhandled_exceptions": self.unhandled,
            "packages_imported": self.imported,
            "untyped_refusals": self.untyped,
            "retries_caused_by_input": self.retries,
            "duplicates": self.duplicates,
            "passed_checks_refused_by_hsm": self.accepted_by_checks,
            "seconds": round(self.seconds, 2),
            "inputs_per_second": round(rate, 1),
            "reasons": dict(self.reasons.most_common()),
        }


# -- the in-process HSM ------------------------------------------------------------------------
class InProcessHsm:
    """The emulator's service without HTTP: KEKs of every size, KEK facts, BYOK imports."""

    def __init__(self, root: Path) -> None:
        from managed_hsm_emulator.datadir import DataDir
        from managed_hsm_emulator.sealing import Sealer
        from managed_hsm_emulator.service import KeyVaultService
        from managed_hsm_emulator.store import KeyStore
        from offline_packager.secret import SecretBytes

        paths = DataDir(root)
        paths.create()
        store = KeyStore(paths, Sealer(SecretBytes(hashlib.sha256(b"fuzz").digest())))
        store.load()
        self.service: KeyVaultService = KeyVaultService(store)
        self.keks: dict[int, tuple[str, rsa.RSAPublicKey]] = {}
        self._facts: dict[str, KekFacts | None] = {}
        self._imports = 0
        for bits in KEK_SIZES:
            body = self._call(
                "create_key",
                f"kek-{bits}",
                body={"kty": "RSA-HSM", "key_size": bits, "key_ops": ["import"]},
            )
            key = body["key"]
            public = rsa.RSAPublicNumbers(_int(key["e"]), _int(key["n"])).public_key()
            self.keks[bits] = (str(key["kid"]), public)

    def _call(
        self, operation: str, name: str | None = None, version: str | None = None, body: Any = None
    ) -> dict[str, Any]:
        from managed_hsm_emulator.routes import Route
        from managed_hsm_emulator.service import ServiceRequest

        req = ServiceRequest(
            Route(operation, name=name, version=version), host=HOST, api_version="7.6", body=body
        )
        response = self.service.handle(req)
        return response.body or {}

    def handle_raw_body(self, operation: str, name: str, body_bytes: bytes) -> int:
        """A request body as the HTTP server reads it: its status (4xx refused, 2xx done).

        Raises:
            Exception: whatever the service raises other than an EmulatorError (a 500).
        """
        from managed_hsm_emulator.errors import EmulatorError
        from managed_hsm_emulator.http_server import parse_request_body
        from managed_hsm_emulator.routes import Route
        from managed_hsm_emulator.service import ServiceRequest

        try:
            body = parse_request_body(body_bytes)
            req = ServiceRequest(
                Route(operation, name=name), host=HOST, api_version="7.6", body=body
            )
            return self.service.handle(req).status
        except EmulatorError as exc:
            return exc.status

    def kek_facts(self, kid: KeyId) -> KekFacts | None:
        """The KEK as the pipeline reads it (None: no such key or version)."""
        if kid.kid not in self._facts:
            from managed_hsm_emulator.errors import KeyNotFoundError

            try:
                body = self._call("get_key", kid.name, kid.version)
            except KeyNotFoundError:
                self._facts[kid.kid] = None
            else:
                key, attrs = body["key"], body.get("attributes", {})
                public = None
                if key.get("n") and key.get("e"):
                    public = rsa.RSAPublicNumbers(_int(key["e"]), _int(key["n"])).public_key()
                self._facts[kid.kid] = KekFacts(
                    kid=str(key["kid"]),
                    kty=str(key["kty"]),
                    key_ops=tuple(key.get("key_ops", ())),
                    enabled=bool(attrs.get("enabled", True)),
                    not_before=_time(attrs.get("nbf")),
                    expires_on=_time(attrs.get("exp")),
                    public_key=public,
                )
        return self._facts[kid.kid]

    def import_package(self, data: bytes, type_name: str, key_ops: tuple[str, ...]) -> None:
        """Import as the pipeline's PUT does, under a fresh name.

        Raises:
            EmulatorError: the HSM refused.
        """
        t = TARGET_TYPES[type_name]
        self._imports += 1
        jwk: dict[str, Any] = {
            "kty": t.kty,
            "key_ops": list(key_ops),
            "key_hsm": b64url_encode(data),
        }
        if t.crv:
            jwk["crv"] = t.crv
        self._call("import_key", f"fuzz-{self._imports}", body={"key": jwk, "Hsm": True})


def _int(b64: str) -> int:
    return int.from_bytes(b64url_decode(b64), "big")


def _time(value: Any) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if isinstance(value, int) else None


# -- seeds -------------------------------------------------------------------------------------
def make_seeds(hsm: InProcessHsm, *, kek_sizes: tuple[int, ...] = KEK_SIZES) -> list[Seed]:
    """One valid package per target type and KEK size, with the metadata ``byok upload`` writes."""
    from offline_packager.kek import check_kek
    from offline_packager.kid import parse_kid
    from offline_packager.package_format import parse_package

    seeds: list[Seed] = []
    for type_name in TYPE_NAMES:
        target = generate_target(type_name)
        for bits in kek_sizes:
            kid, public = hsm.keks[bits]
            ct = wrap_target(public, target.plaintext)
            data = encode_package(kid, ct, "byok-package fuzz seed")
            sha = hashlib.sha256(data).hexdigest()
            options = ImportOptions(
                target_type=target.type,
                key_ops=target.type.default_key_ops,
                fingerprint=target.fingerprint,
                package_sha256=sha,
                kek_spki_sha256=check_kek(public).fingerprint,
            )
            name = f"seed-{type_name}-{bits}"
            identity = package_id(parse_package(data), parse_kid(kid))
            seeds.append(
                Seed(type_name, bits, f"{name}.byok", data, options.to_metadata(), kid, identity)
            )
        target.plaintext.wipe()
    return seeds


# -- mutators ----------------------------------------------------------------------------------
Mutator = Callable[[random.Random, Seed, "Campaign"], Mutant]


def _doc(seed: Seed) -> dict[str, Any]:
    return cast("dict[str, Any]", json.loads(seed.data))


def _ct(seed: Seed) -> bytes:
    return b64url_decode(_doc(seed)["ciphertext"])


def _meta_without_sha(rng: random.Random, seed: Seed) -> dict[str, str]:
    """A mutated package cannot carry its seed's package SHA-256 (that refusal would hide the
    deeper checks): no metadata, or the seed's without the digests."""
    if rng.random() < 0.5:
        return {}
    digests = (META_PACKAGE_SHA256, META_MANIFEST_SHA256)
    return {k: v for k, v in seed.metadata.items() if k not in digests}


def _package(kind: str, rng: random.Random, seed: Seed, data: bytes) -> Mutant:
    return Mutant(kind, seed, seed.blob_name, data, _meta_without_sha(rng, seed))


def _with_ct(rng: random.Random, seed: Seed, kind: str, ct: bytes) -> Mutant:
    doc = _doc(seed)
    doc["ciphertext"] = b64url_encode(ct)
    return _package(kind, rng, seed, json.dumps(doc, separators=(",", ":")).encode())


def _flip(data: bytes, index: int, bit: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


def rsa_block_flip(rng: random.Random, seed: Seed, _c: Campaign) -> Mutant:
    ct, k = _ct(seed), seed.kek_bits // 8
    return _with_ct(rng, seed, "rsa_block_flip", _flip(ct, rng.randrange(k), rng.randrange(8)))


def kwp_block_flip(rng: random.Random, seed: Seed, _c: Campaign) -> Mutant:
    ct, k = _ct(seed), seed.kek_bits // 8
    index = rng.randrange(k, len(ct))
    return _with_ct(rng, seed, "kwp_block_flip", _flip(ct, index, rng.randrange(8)))


def ciphertext_length(rng: random.Random, seed: Seed, _c: Campaign) -> Mutant:
    ct = _ct(seed)
    n = rng.choice([1, 7, 8, 16, 40, rng.randrange(1, len(ct))])
    if rng.random() < 0.5:
        return _with_ct(rng, seed, "ciphertext_truncated", ct[:-n])
    return _with_ct(rng, seed, "ciphertext_extended", ct + rng.randbytes(n))


def file_length(rng: random.Random, seed: Seed, _c: Campaign) -> Mutant:
    data = seed.data
    if rng.random() < 0.5:
        return _package("file_truncated", rng, seed, data[: rng.randrange(len(data))])
    tail = rng.choice([b"\n", b"\x00", b"}", b" garbage", rng.randbytes(rng.randrange(1, 64))])
    return _package("file_extended", rng, seed, data + tail)


def file_bit_flip(rng: random.Random, seed: Seed, _c: Campaign) -> Mutant:
    data = seed.data
    return _package(
        "file_bit_flip", rng, seed, _flip(data, rng.randrange(len(data)), rng.randrange(8))
    )


def _odd_value(rng: random.Random) -> Any:
    choice = rng.randrange(12)
    values: list[Any] = [
        None,
        True,
        0,
        -1,
        1.5e308,
        [],
        {},
        "",
        "x" * 5000,
        [[[[]]]],
        {"a": {"b": 1}},
        "\u0000",
    ]
    return values[choice]


def json_level(rng: random.Random, seed: Seed, _c: Campaign) -> Mutant:
    doc = _doc(seed)
    op = rng.randrange(13)
    header = doc["header"]
    if op == 0:
        del doc[rng.choice(sorted(doc))]
    elif op == 1:
        del header[rng.choice(sorted(header))]
    elif op == 2:
        doc[rng.choice(["extra", "Header", "ciphertext ", "kid"])] = "x"
    elif op == 3:
        doc[rng.choice(sorted(doc))] = _odd_value(rng)
    elif op == 4:
        header[rng.choice(sorted(header))] = _odd_value(rng)
    elif op == 5:
        doc["schema_version"] = rng.choice(["1.0", "2.0.0", "1.0.0 ", "1.0.0\n", "\uff11.0.0"])
    elif op == 6:
        header["alg"] = rng.choice(["DIR", "dir ", "RSA-OAEP", "dir\x00", "none"])
    elif op == 7:
        header["enc"] = rng.choice(["CKM_RSA_AES_KEY_WRAP\n", "ckm_rsa_aes_key_wrap", "A256KW"])
    text = json.dumps(doc, separators=(",", ":"))
    if op == 8:  # a huge integer or a deep nest anywhere
        text = text[:-1] + rng.choice(
            [f',"n":{_HUGE}}}', ',"d":' + "[" * 5000 + "]" * 5000 + "}", f',"f":1e{_HUGE[:400]}}}']
        )
    elif op == 9:  # a duplicate field
        field_name = rng.choice(['"ciphertext"', '"header"', '"schema_version"'])
        text = text[:-1] + f",{field_name}:" + json.dumps(doc.get(field_name.strip('"'))) + "}"
    elif op == 10:
        text = text.replace(
            rng.choice(["1.0.0", "dir", "{", ":"]),
            rng.choice(["NaN", "Infinity", "-Infinity", "\ufeff", "'"]),
            1,
        )
    elif op == 11:  # neutral: the same package, reformatted
        return _package("reformatted", rng, seed, _reformat(rng, doc))
    elif op == 12:
        raw = text.encode()
        enc = rng.choice(["utf-16", "latin-1-bytes", "invalid-utf8"])
        data = (
            text.encode("utf-16")
            if enc == "utf-16"
            else raw.replace(b'"dir"', b'"d\xe9r"' if enc == "latin-1-bytes" else b'"d\xff\xfer"')
        )
        return _package("json_encoding", rng, seed, data)
    return _package("json_level", rng, seed, text.encode("utf-8", "surrogatepass"))


def _reformat(rng: random.Random, doc: dict[str, Any]) -> bytes:
    ct = b64url_decode(doc["ciphertext"])
    if rng.random() < 0.5:
        padded = base64.urlsafe_b64encode(ct).decode()
        doc["ciphertext"] = padded
    if rng.random() < 0.5:
        doc = dict(reversed(list(doc.items())))
    if rng.random() < 0.3:
        doc["generator"] = "another producer 2.0"
    text = json.dumps(doc, indent=rng.choice([None, 2, 4]))
    if rng.random() < 0.5:
        text = text.replace("\n", "\r\n") + "\r\n"
    data = text.encode()
    return (b"\xef\xbb\xbf" + data) if rng.random() < 0.3 else data


def kid_mutation(rng: random.Random, seed: Seed, c: Campaign) -> Mutant:
    doc = _doc(seed)
    kid: str = doc["header"]["kid"]
    op = rng.randrange(9)
    if op == 0:  # an odd character anywhere
        i = rng.randrange(len(kid) + 1)
        kid = kid[:i] + rng.choice(_ODD_CHARS) + kid[i:]
    elif op == 1:
        kid = kid.replace(
            "https://",
            rng.choice(["http://", "HTTPS://", "https:/", "https://user@", "https://[", ""]),
        )
    elif op == 2:
        kid = (
            kid.rsplit("/", 1)[0]
            + "/"
            + rng.choice(
                ["", "A" * 32, "0" * 31, "0" * 33, "g" * 32, kid.rsplit("/", 1)[1].upper()]
            )
        )
    elif op == 3:
        kid = kid.replace(
            HOST,
            rng.choice(
                [
                    "other.managedhsm.example",
                    "fuzz.managedhsm.example:444",
                    "FUZZ.managedhsm.example:443",
                    "fuzz.managedhsm.example:99999",
                    "[::1]:443",
                    "fuzz..example",
                ]
            ),
        )
    elif op == 4:
        kid = kid.replace("/keys/", rng.choice(["/Keys/", "/keys//", "/secrets/", "/keys/a/"]))
    elif op == 5:
        kid = kid + rng.choice(["\n", "/", "?x=1", "#f", " ", "\x00"])
    elif op == 6:  # a real KEK of another size (the package was wrapped under this seed's)
        others = [b for b in c.hsm.keks if b != seed.kek_bits]
        kid = c.hsm.keks[rng.choice(others)][0]
    elif op == 7:
        kid = kid.replace("kek-", rng.choice(["kek_", "kek-\u00e9", "", "kek-" + "x" * 200]))
    else:
        kid = rng.choice(["", "x" * 600, kid * 2])
    doc["header"]["kid"] = kid
    return _package("kid", rng, seed, json.dumps(doc).encode("utf-8", "surrogatepass"))


def base64_mutation(rng: random.Random, seed: Seed, _c: Campaign) -> Mutant:
    doc = _doc(seed)
    text: str = doc["ciphertext"]
    op = rng.randrange(6)
    if op == 0:
        i = rng.randrange(len(text) + 1)
        text = (
            text[:i]
            + rng.choice(["+", "/", "=", "\n", " ", "\t", "*", ".", "\u00e9", "=="])
            + text[i:]
        )
    elif op == 1:
        text = text + rng.choice(["=", "==", "===", "=\n", "==\n", "\n", "\r\n", " "])
    elif op == 2:
        text = text[: -rng.randrange(1, 4)]
    elif op == 3:
        text = base64.b64encode(b64url_decode(text)).decode()  # the standard alphabet
    elif op == 4:
        text = rng.choice(["", "=", "====", "A", "AA=A"])
    else:
        text = text[:100] + "\n" + text[100:]  # a wrapped line
    doc["ciphertext"] = text
    return _package("base64", rng, seed, json.dumps(doc).encode())


def blob_name_mutation(rng: random.Random, seed: Seed, _c: Campaign) -> Mutant:
    stem = seed.blob_name[:-5]
    op = rng.randrange(8)
    if op == 0:
        i = rng.randrange(len(stem) + 1)
        name = stem[:i] + rng.choice([*_ODD_CHARS[:-2], "_", "\u0435"]) + stem[i:] + ".byok"
    elif op == 1:
        name = seed.blob_name + rng.choice(["\n", "\r\n", " ", "\x00", ".byok", "x"])
    elif op == 2:
        name = stem + rng.choice([".BYOK", ".byo", "byok", ".byok.json", ""])
    elif op == 3:
        name = rng.choice(
            [".byok", "-.byok", "x" * 128 + ".byok", "a/b.byok", "../x.byok", "x.y.byok"]
        )
    elif op == 4:
        name = "\u043a\u043b\u044e\u0447.byok"
    elif op == 5:
        name = "x" * 127 + ".byok"  # valid: the longest name (a duplicate of its seed)
    elif op == 6:
        name = stem.upper() + ".byok"  # valid: another key name, same bytes
    else:
        name = stem + "\u0000.byok"
    return Mutant("blob_name", seed, name, seed.data, dict(seed.metadata))


def metadata_mutation(rng: random.Random, seed: Seed, _c: Campaign) -> Mutant:
    meta = dict(seed.metadata)
    op = rng.randrange(10)
    if op == 0:
        meta[META_TAGS] = rng.choice(
            [
                "[" * 3000 + "]" * 3000,
                '{"a":' * 1500 + "1" + "}" * 1500,
                "{",
                '{"a":1}',
                '{"a":"b","a":"c"}',
                f'{{"a":{_HUGE}}}',
                '{"byok-package-sha256":"x"}',
                json.dumps({str(i): "v" for i in range(11)}),
                '{"a":NaN}',
                "x" * 9000,
            ]
        )
    elif op == 1:
        meta[META_TARGET_TYPE] = rng.choice(
            ["rsa-1024", "RSA-2048\n", "", "oct-256 ", "ec-p256k\x00"]
        )
    elif op == 2:
        meta[META_KEY_OPS] = rng.choice(
            ["", ",", "sign,import", "encrypt\n", "x" * 300, "sign," * 100]
        )
    elif op == 3:
        meta[META_FINGERPRINT] = rng.choice(
            [
                "kcv:",
                "spki-sha256:" + "g" * 64,
                "spki-sha256:" + "a" * 64 + "\n",
                "kcv:ABCDEF\n",
                "x:y",
                "kcv:abcdeg",
            ]
        )
    elif op == 4:
        meta[META_PACKAGE_SHA256] = rng.choice(
            ["0" * 64, "A" * 64, seed.metadata.get(META_PACKAGE_SHA256, "") + "\n", ""]
        )
    elif op == 5:
        meta["byok_" + rng.choice(["unknown", "TAGS2", "x"])] = "1"
    elif op == 6:
        meta["BYOK_TARGET_TYPE"] = rng.choice(["rsa-2048", "nonsense"])
    elif op == 7:
        meta["byok_uploader"] = "u" * rng.choice([10, 300])
    elif op == 8:
        meta["byok_kek_sha256"] = rng.choice(["0" * 64, "z"])
    else:
        meta = dict.fromkeys(meta, "")
    return Mutant("metadata", seed, seed.blob_name, seed.data, meta)


MUTATORS: tuple[Mutator, ...] = (
    json_level,
    json_level,
    kid_mutation,
    kid_mutation,
    base64_mutation,
    rsa_block_flip,
    kwp_block_flip,
    ciphertext_length,
    file_length,
    file_bit_flip,
    blob_name_mutation,
    metadata_mutation,
)


def mutants(seeds: list[Seed], campaign: Campaign, count: int, seed: int) -> Iterator[Mutant]:
    """``count`` mutants from ``seeds``, the same ones for the same ``seed``."""
    rng = random.Random(seed)  # noqa: S311  # reproducible mutations, not secrets
    for _ in range(count):
        mutator = rng.choice(MUTATORS)
        yield mutator(rng, rng.choice(seeds), campaign)


# -- running -----------------------------------------------------------------------------------
@dataclass
class Campaign:
    """The in-process HSM, the seeds, and the settings the checks run under."""

    hsm: InProcessHsm
    settings: Settings
    seeds: list[Seed] = field(default_factory=list)

    @classmethod
    def create(cls, root: Path) -> Campaign:
        hsm = InProcessHsm(root)
        campaign = cls(hsm, Settings(hsm_url=f"https://{HOST}"))
        campaign.seeds = make_seeds(hsm)
        for s in campaign.seeds:  # the originals import (and so would a reformatted copy)
            t = TARGET_TYPES[s.type_name]
            hsm.import_package(s.data, s.type_name, t.default_key_ops)
        return campaign

    @property
    def identities(self) -> frozenset[str]:
        return frozenset(s.identity for s in self.seeds)

    def check(self, mutant: Mutant, tally: Tally) -> None:
        """One mutant through the pipeline's checks in their order, then the HSM's import."""
        from managed_hsm_emulator.errors import EmulatorError

        tally.inputs += 1
        try:
            outcome = self._checks_and_import(mutant)
        except Rejected as exc:
            self._refused(tally, mutant, exc.reason)
        except TransientError as exc:
            tally.fail("retries", mutant, f"TransientError {exc.reason}")
        except ByokError as exc:
            self._refused(tally, mutant, exc.reason)
        except EmulatorError as exc:
            if exc.status >= 500:  # HTTP status: a server error is never an answer to input
                tally.fail("untyped", mutant, f"emulator {exc.status} {exc.reason}")
            else:
                tally.reasons[f"hsm_refused/{exc.reason}"] += 1
                tally.accepted_by_checks += 1
        except Exception as exc:  # noqa: BLE001  # the campaign's point: count, never crash
            tally.fail("unhandled", mutant, type(exc).__name__)
        else:
            if outcome == "duplicate":
                tally.duplicates += 1
            else:
                tally.fail("imported", mutant, "the HSM imported a mutated package")

    @staticmethod
    def _refused(tally: Tally, mutant: Mutant, reason: str) -> None:
        if reason in REASONS:
            tally.reasons[reason] += 1
        else:
            tally.fail("untyped", mutant, f"reason {reason!r}")

    def _checks_and_import(self, mutant: Mutant) -> str:
        """What the processor does for a fresh drop, in the README's order, minus storage.

        Raises:
            Rejected, ByokError, TransientError, EmulatorError: as the pipeline would see them.
        """
        from byok_pipeline.core.validation import check_against_kek, check_kek_facts

        sha = hashlib.sha256(mutant.data).hexdigest()
        blob = _incoming(mutant)
        _, options = check_drop(blob, sha, self.settings)
        package, kid = read_package(mutant.data, self.settings)
        if package_id(package, kid) in self.identities:
            return "duplicate"
        facts = self.hsm.kek_facts(kid)
        if facts is None:
            raise Rejected("kek_missing", "no such KEK")
        kek = check_kek_facts(facts, datetime.now(UTC))
        if options.kek_spki_sha256 and options.kek_spki_sha256 != kek.fingerprint:
            raise Rejected("kek_mismatch", "the manifest names another KEK")
        validated = check_against_kek(mutant.data, kek, kid, options, self.settings)
        self.hsm.import_package(mutant.data, validated.target_type.name, validated.key_ops)
        return "imported"

    def run(self, count: int, seed: int) -> Tally:
        tally = Tally()
        started = time.monotonic()
        for mutant in mutants(self.seeds, self, count, seed):
            self.check(mutant, tally)
        tally.seconds = time.monotonic() - started
        return tally

    def run_emulator_bodies(self, count: int, seed: int) -> Tally:
        """Mutated import request bodies straight into the emulator's request path: every one
        must be answered 4xx (or 2xx for a body that is still valid), never 500."""
        tally = Tally()
        rng = random.Random(seed)  # noqa: S311  # reproducible mutations, not secrets
        started = time.monotonic()
        for i in range(count):
            mutant = rng.choice(MUTATORS)(rng, rng.choice(self.seeds), self)
            body = _body_mutation(rng, mutant)
            tally.inputs += 1
            try:
                status = self.hsm.handle_raw_body("import_key", f"body-{seed}-{i}", body)
            except Exception as exc:  # noqa: BLE001  # an uncaught error is the HTTP server's 500
                tally.fail(
                    "unhandled",
                    replace(mutant, kind=f"emulator_body/{mutant.kind}"),
                    type(exc).__name__,
                )
                continue
            if status >= 500:  # HTTP status
                tally.fail("untyped", mutant, f"emulator answered {status}")
            elif status < 300:  # HTTP status: a body that stayed valid (the HSM has no idempotency
                tally.reasons["emulator_accepted_valid_body"] += 1  # of its own: the pipeline has)
            else:
                tally.reasons[f"emulator_{status}"] += 1
        tally.seconds = time.monotonic() - started
        return tally


def _body_mutation(rng: random.Random, mutant: Mutant) -> bytes:
    t = TARGET_TYPES[mutant.seed.type_name]
    jwk: dict[str, Any] = {
        "kty": t.kty,
        "key_ops": list(t.default_key_ops),
        "key_hsm": b64url_encode(mutant.data),
    }
    if t.crv:
        jwk["crv"] = t.crv
    body: dict[str, Any] = {
        "key": jwk,
        "Hsm": True,
        "attributes": {"enabled": True},
        "tags": {"a": "b"},
    }
    op = rng.randrange(8)
    if op == 0:
        jwk[rng.choice(sorted(jwk))] = _odd_value(rng)
    elif op == 1:
        body[rng.choice(["key", "attributes", "tags", "Hsm"])] = _odd_value(rng)
    elif op == 2:
        body["attributes"] = {rng.choice(["exp", "nbf", "enabled", "exportable"]): _odd_value(rng)}
    elif op == 3:
        body["tags"] = {"k": _odd_value(rng)}
    elif op == 4:
        jwk["key_hsm"] = rng.choice(["", "!", "=" * 4, b64url_encode(mutant.data) + "\n"])
    elif op == 5:
        jwk["kty"] = rng.choice(["RSA", "oct-HSM", "EC-HSM", "x", "RSA-HSM\n"])
    text = json.dumps(body)
    if op == 6:
        text = text[:-1] + rng.choice(
            [f',"n":{_HUGE}}}', ',"d":' + "[" * 5000 + "]" * 5000 + "}", "", ',"key":{}}']
        )
    if op == 7:
        return rng.choice(
            [b"", b"null", b"[]", b'"x"', b"\xff\xfe", text.encode()[: rng.randrange(len(text))]]
        )
    return text.encode()


def _incoming(mutant: Mutant) -> Any:
    from byok_pipeline.adapters.blobstore import IncomingBlob

    return IncomingBlob(mutant.blob_name, '"0x1"', len(mutant.data), mutant.data, mutant.metadata)


def run_pipeline_share(
    deps: Any, campaign: Campaign, count: int, seed: int, *, hsm_kids: dict[int, str]
) -> Tally:
    """``count`` mutants through the whole pipeline (``process_blob``) against Azurite and the
    emulator over HTTPS: each must end ``rejected`` with a known reason or ``duplicate``, at
    once (one attempt), out of the incoming container.

    ``deps`` are the pipeline's (``localdev.stack.emulator_deps``); ``hsm_kids`` the kids of
    that emulator's KEKs by size (the seeds are re-made under them).
    """
    from azure.core.exceptions import AzureError

    from byok_pipeline.core.errors import InProgress
    from byok_pipeline.processing.processor import process_blob

    tally = Tally()
    started = time.monotonic()
    seeds = _pipeline_seeds(deps, hsm_kids)
    for i, mutant in enumerate(mutants(seeds, campaign, count, seed)):
        name = mutant.blob_name
        try:
            deps.store.upload_incoming(name, mutant.data, _ascii_meta(mutant.metadata))
        except (AzureError, ValueError, UnicodeError):
            continue  # the storage (or its SDK) refuses this name or metadata: no drop to process
        tally.inputs += 1
        try:
            outcome = process_blob(name, deps)
        except (TransientError, InProgress) as exc:
            tally.fail("retries", mutant, f"{type(exc).__name__} {exc.reason} (input {i})")
            _clear(deps, name)
            continue
        except Exception as exc:  # noqa: BLE001  # the campaign's point: count, never crash
            tally.fail("unhandled", mutant, type(exc).__name__)
            _clear(deps, name)
            continue
        doc = outcome.doc
        if outcome.state == "duplicate":
            tally.duplicates += 1
        elif outcome.state == "rejected" and outcome.reason_code in REASONS:
            tally.reasons[str(outcome.reason_code)] += 1
        elif outcome.state == "imported":
            tally.fail("imported", mutant, "imported by the pipeline")
        else:
            tally.fail("untyped", mutant, f"{outcome.state}/{outcome.reason_code}")
        if doc is not None and doc.attempts > 1:
            tally.fail("retries", mutant, f"{doc.attempts} attempts")
        if name in deps.store.list_incoming():
            tally.fail("untyped", mutant, "left in incoming")
            _clear(deps, name)
    tally.seconds = time.monotonic() - started
    return tally


def _pipeline_seeds(deps: Any, hsm_kids: dict[int, str]) -> list[Seed]:
    """The campaign's seeds re-wrapped for the running emulator's KEKs and imported once
    through the pipeline (so their reformatted copies are duplicates)."""
    from byok_pipeline.processing.processor import process_blob
    from offline_packager.kid import parse_kid
    from offline_packager.package_format import parse_package

    seeds: list[Seed] = []
    facts_by_bits = {}
    for bits, kid in hsm_kids.items():
        public = deps.hsm.get_kek(parse_kid(kid), request_id="fuzz").public_key
        assert public is not None  # noqa: S101  # the caller names RSA KEKs
        facts_by_bits[bits] = public
    for type_name in TYPE_NAMES:
        target = generate_target(type_name)
        bits = KEK_SIZES[TYPE_NAMES.index(type_name) % len(KEK_SIZES)]
        kid = hsm_kids[bits]
        ct = wrap_target(facts_by_bits[bits], target.plaintext)
        target.plaintext.wipe()
        data = encode_package(kid, ct, "byok-package fuzz seed")
        name = f"pseed-{type_name}-{hashlib.sha256(data).hexdigest()[:8]}.byok"
        meta = {META_TARGET_TYPE: type_name}
        deps.store.upload_incoming(name, data, meta)
        outcome = process_blob(name, deps)
        if outcome.state != "imported":
            raise RuntimeError(
                f"a valid seed did not import: {outcome.state} {outcome.reason_code}"
            )
        identity = package_id(parse_package(data), parse_kid(kid))
        seeds.append(Seed(type_name, bits, name, data, meta, kid, identity))
    return seeds


def _ascii_meta(meta: dict[str, str]) -> dict[str, str]:
    """Blob metadata travels in HTTP headers: values outside printable ASCII cannot be sent."""
    return {k: v for k, v in meta.items() if v.isascii() and v.isprintable() and len(v) < 4096}


def _clear(deps: Any, name: str) -> None:
    from azure.core.exceptions import AzureError

    with contextlib.suppress(AzureError):
        deps.store.service.get_blob_client(deps.settings.incoming_container, name).delete_blob()


def campaign_in(
    directory: str | None = None,
) -> tuple[Campaign, tempfile.TemporaryDirectory[str] | None]:
    """A campaign with its emulator data under ``directory`` (a temporary one if None)."""
    holder = None if directory else tempfile.TemporaryDirectory(prefix="byok-fuzz-")
    root = Path(directory or cast("tempfile.TemporaryDirectory[str]", holder).name) / "hsm"
    return Campaign.create(root), holder
