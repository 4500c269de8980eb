"""The pure core without HTTP: tokens, sealing, routes, key-op rules, BYOK unwrap, crypto, and
the service with a fixed clock and deterministic randomness."""

from __future__ import annotations

import itertools
import json
import string
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from managed_hsm_emulator import crypto_ops
from managed_hsm_emulator.byok import Kek, import_byok, parse_kek_kid
from managed_hsm_emulator.datadir import DataDir
from managed_hsm_emulator.errors import (
    BadParameterError,
    EmulatorError,
    ForbiddenError,
    KeyNotFoundError,
    MethodNotAllowedError,
    PathNotFoundError,
    StartupError,
    UnauthorizedError,
)
from managed_hsm_emulator.faults import FaultInjector
from managed_hsm_emulator.identity import Identity
from managed_hsm_emulator.material import KeyMaterial
from managed_hsm_emulator.model import KeyAttributes, KeyVersion, check_key_ops
from managed_hsm_emulator.routes import Route, route
from managed_hsm_emulator.sealing import Sealer, SealError
from managed_hsm_emulator.service import KeyVaultService, ServiceRequest
from managed_hsm_emulator.store import KeyStore
from managed_hsm_emulator.tokens import AUDIENCE, mint_token, verify_token
from offline_packager.errors import KidError
from offline_packager.kid import KeyId
from offline_packager.package_format import b64url_decode, b64url_encode, encode_package
from offline_packager.secret import SecretBytes
from offline_packager.target_keys import key_check_value
from offline_packager.wrap import wrap_target

KEY = SecretBytes(b"\x01" * 32)
NOW = 1_700_000_000


# --- tokens -------------------------------------------------------------------------------


def test_token_round_trip_and_time_window() -> None:
    token = mint_token(KEY, audience=AUDIENCE, issued_at=NOW, lifetime_seconds=3600)
    assert verify_token(KEY, token, now=NOW + 10)["aud"] == AUDIENCE
    with pytest.raises(UnauthorizedError) as exc:
        verify_token(KEY, token, now=NOW + 3600 + 61)
    assert exc.value.reason == "token_expired"
    with pytest.raises(UnauthorizedError) as exc:
        verify_token(KEY, token, now=NOW - 120)
    assert exc.value.reason == "token_not_yet_valid"
    with pytest.raises(UnauthorizedError) as exc:
        verify_token(SecretBytes(b"\x02" * 32), token, now=NOW)
    assert exc.value.reason == "token_bad_signature"


def test_every_single_character_change_to_a_token_is_rejected() -> None:
    # Deterministic and exhaustive: every position, every base64url character and the
    # separators. Changing a signature's last character only in its spare bits decodes to the
    # same bytes; it must still be refused (non-canonical base64url).
    token = mint_token(KEY, audience=AUDIENCE, issued_at=NOW, lifetime_seconds=3600)
    verify_token(KEY, token, now=NOW)
    alphabet = string.ascii_letters + string.digits + "-_.=+/ "
    accepted = []
    tried = 0
    for i, original in enumerate(token):
        for replacement in alphabet:
            if replacement == original:
                continue
            changed = token[:i] + replacement + token[i + 1 :]
            tried += 1
            try:
                verify_token(KEY, changed, now=NOW)
            except UnauthorizedError:
                continue
            accepted.append((i, replacement))
    assert accepted == []
    assert tried == len(token) * (len(alphabet) - 1)


def test_non_canonical_base64url_signature_is_malformed() -> None:
    token = mint_token(KEY, audience=AUDIENCE, issued_at=NOW, lifetime_seconds=3600)
    head, sig = token.rsplit(".", 1)
    # 32 bytes -> 43 characters: the last one carries 2 spare bits; set one of them
    last = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    spare = last[last.index(sig[-1]) ^ 1]
    assert b64url_decode(sig[:-1] + spare) == b64url_decode(sig)  # same bytes...
    with pytest.raises(UnauthorizedError) as exc:  # ...still refused
        verify_token(KEY, f"{head}.{sig[:-1]}{spare}", now=NOW)
    assert exc.value.reason == "token_malformed"
    with pytest.raises(UnauthorizedError) as exc:  # padding is not canonical either
        verify_token(KEY, f"{head}.{sig}=", now=NOW)
    assert exc.value.reason == "token_malformed"


# --- sealing ------------------------------------------------------------------------------


def test_sealing_binds_name_and_version() -> None:
    counter = itertools.count()
    sealer = Sealer(KEY, randbytes=lambda n: bytes([next(counter) % 256]) * n)
    blob = sealer.seal(SecretBytes(b"material"), name="K", version="v1")
    assert b"material" not in blob
    assert sealer.open(blob, name="k", version="v1").reveal() == b"material"
    for name, version in (("other", "v1"), ("k", "v2")):
        with pytest.raises(SealError):
            sealer.open(blob, name=name, version=version)
    with pytest.raises(SealError):
        Sealer(SecretBytes(b"\x09" * 32)).open(blob, name="k", version="v1")
    assert "redacted" in repr(sealer)


# --- routes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/keys", Route("list_keys")),
        ("GET", "/keys/", Route("list_keys")),
        ("PUT", "/keys/k", Route("import_key", name="k")),
        ("GET", "/keys/k/", Route("get_key", name="k", version="")),
        ("GET", "/keys/k/abc", Route("get_key", name="k", version="abc")),
        ("PATCH", "/keys/k/", Route("update_key", name="k", version="")),
        ("POST", "/keys/k/create", Route("create_key", name="k")),
        ("GET", "/keys/k/versions", Route("list_versions", name="k")),
        ("POST", "/keys/k/v/wrapkey", Route("key_operation", "k", "v", "wrapKey")),
        ("POST", "/keys/k//sign", Route("key_operation", "k", "", "sign")),
        ("GET", "/deletedkeys", Route("list_deleted_keys")),
        ("DELETE", "/deletedkeys/k", Route("purge_deleted_key", name="k")),
        ("POST", "/deletedkeys/k/recover", Route("recover_deleted_key", name="k")),
        ("POST", "/rng", Route("get_random_bytes")),
    ],
)
def test_routes(method: str, path: str, expected: Route) -> None:
    assert route(method, path) == expected


def test_unknown_routes() -> None:
    with pytest.raises(PathNotFoundError):
        route("GET", "/secrets/x")
    with pytest.raises(PathNotFoundError):
        route("POST", "/keys/k/v/fly")
    with pytest.raises(MethodNotAllowedError):
        route("DELETE", "/keys/k/create")


# --- key operation rules ------------------------------------------------------------------------


def test_key_ops_rules() -> None:
    assert check_key_ops("RSA", None, origin="generated") == (
        "encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey",
    )  # fmt: skip
    assert check_key_ops("RSA", ["import"], origin="generated") == ("import",)
    for family, ops, origin in (
        ("RSA", ["import", "sign"], "generated"),
        ("RSA", ["import"], "byok"),
        ("EC", ["import"], "generated"),
        ("oct", ["sign"], "generated"),
        ("EC", "sign", "generated"),
    ):
        with pytest.raises(BadParameterError):
            check_key_ops(family, ops, origin=origin)  # type: ignore[arg-type]  # literals


def _version(
    family: str, ops: tuple[str, ...], material: KeyMaterial, **attrs: object
) -> KeyVersion:
    attributes = KeyAttributes(enabled=True, created=NOW, updated=NOW)
    if attrs:
        attributes = attributes.updated_from(attrs, now=NOW)
    return KeyVersion(
        name="kek", version="a" * 32, seq=1, family=family,  # type: ignore[arg-type]  # literal
        key_ops=ops, attributes=attributes, tags={}, public={}, sealed=b"", origin="generated",
        material=material,
    )  # fmt: skip


def test_require_usable() -> None:
    material = KeyMaterial.generate("EC", key_size=None, crv="P-256")
    v = _version("EC", ("sign",), material, exp=NOW + 10)
    v.require_usable("sign", now=NOW)
    with pytest.raises(ForbiddenError, match="not allowed"):
        v.require_usable("verify", now=NOW)
    with pytest.raises(ForbiddenError) as exc:
        v.require_usable("sign", now=NOW + 10)
    assert exc.value.reason == "key_expired"


# --- BYOK core ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kek_material() -> KeyMaterial:
    return KeyMaterial("RSA", rsa_key=rsa.generate_private_key(65537, 2048))


def _find(v: KeyVersion) -> object:
    def find(kid: KeyId) -> Kek:
        if kid.name != v.name or kid.version != v.version:
            raise KeyNotFoundError("no such KEK", reason="kek_not_found")
        assert v.material is not None
        assert v.material.rsa_key is not None
        return Kek(v, v.material.rsa_key)

    return find


def test_import_byok_core(kek_material: KeyMaterial) -> None:
    kek = _version("RSA", ("import",), kek_material)
    assert kek_material.rsa_key is not None
    aes = bytes(range(16))
    kid = f"https://hsm.example:8443/keys/kek/{'a' * 32}"
    package = encode_package(
        kid, wrap_target(kek_material.rsa_key.public_key(), SecretBytes(aes)), "t"
    )
    key_hsm = b64url_encode(package)
    hosts = frozenset({"hsm.example:8443", "localhost:8443"})
    args = {"hosts": hosts, "find_kek": _find(kek), "now": NOW}
    material = import_byok(key_hsm, family="oct", crv=None, **args)  # type: ignore[arg-type]  # test dict
    assert material.aes_key is not None
    assert material.aes_key.reveal() == aes
    assert "redacted" in repr(material)
    for other in ({"other:1"}, {"hsm.example:8444"}, {"localhost:8443"}):
        with pytest.raises(BadParameterError) as exc:
            import_byok(key_hsm, family="oct", crv=None, **{**args, "hosts": frozenset(other)})  # type: ignore[arg-type]  # test dict
        assert exc.value.reason == "kid_wrong_hsm"
    with pytest.raises(BadParameterError) as exc:
        import_byok(key_hsm, family="EC", crv="P-256", **args)  # type: ignore[arg-type]  # test dict
    assert exc.value.reason == "kty_mismatch"
    expired = _version("RSA", ("import",), kek_material, exp=NOW - 1, nbf=NOW - 100)
    with pytest.raises(BadParameterError) as exc:
        import_byok(key_hsm, family="oct", crv=None, **{**args, "find_kek": _find(expired)})  # type: ignore[arg-type]  # test dict
    assert exc.value.reason == "kek_expired"
    # messages never carry the package or the key
    assert key_hsm[:32] not in exc.value.message
    assert aes.hex() not in exc.value.message


@pytest.mark.parametrize(
    ("kid_host", "accepted"),
    [
        ("127.0.0.1:8443", True),
        ("LOCALHOST:8443", True),
        ("[::1]:8443", True),
        ("[0:0:0:0:0:0:0:1]:8443", True),  # the same IPv6 address, spelled out
        ("127.0.0.1:8444", False),
        ("[::2]:8443", False),
        ("evil.example:8443", False),
    ],
)
def test_package_kid_must_name_one_of_the_emulators_authorities(
    kid_host: str, accepted: bool
) -> None:
    hosts = Identity(bound_host="127.0.0.1", port=8443).authorities
    kid = f"https://{kid_host}/keys/kek/{'a' * 32}"
    if accepted:
        parsed = parse_kek_kid(kid, hosts)
        assert (parsed.name, parsed.version) == ("kek", "a" * 32)
        return
    with pytest.raises(KidError) as exc:
        parse_kek_kid(kid, hosts)
    assert exc.value.reason == "kid_wrong_hsm"


@pytest.mark.parametrize(
    "kid",
    [
        "https://[::1]:8443/keys/kek",  # no version
        "https://u:p@[::1]:8443/keys/kek/" + "a" * 32,  # credentials
        "https://[::1]:99999/keys/kek/" + "a" * 32,  # port out of range
        "https://[nonsense]:8443/keys/kek/" + "a" * 32,
        "http://127.0.0.1:8443/keys/kek/" + "a" * 32,
    ],
)
def test_malformed_package_kids_are_bad_kid(kid: str) -> None:
    hosts = Identity(bound_host="127.0.0.1", port=8443).authorities
    with pytest.raises(KidError) as exc:
        parse_kek_kid(kid, hosts)
    assert exc.value.reason == "bad_kid"


def test_identity_authorities() -> None:
    assert Identity(bound_host="127.0.0.1", port=8443).authorities == {
        "127.0.0.1:8443", "localhost:8443", "[::1]:8443",
    }  # fmt: skip
    assert Identity(bound_host="0.0.0.0", port=1).authorities == {  # noqa: S104  # the wildcard
        "127.0.0.1:1", "localhost:1", "[::1]:1",
    }  # fmt: skip
    assert "127.0.0.2:1" in Identity(bound_host="127.0.0.2", port=1).authorities
    assert "[::1]:1" in Identity(bound_host="0:0::1", port=1).authorities
    assert "localhost" in Identity(bound_host="localhost", port=443).authorities


@pytest.mark.parametrize("zeros", range(1, 8))
def test_softhsm_zero_padded_pkcs8_is_refused_with_its_own_reason(zeros: int) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    der = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(BadParameterError) as exc:
        KeyMaterial.from_plaintext("EC", SecretBytes(der + bytes(zeros)))
    assert exc.value.reason == "plaintext_trailing_zeros"
    assert "SoftHSM" in exc.value.message
    # other trailing bytes, or 8 zeros (not padding to a multiple of 8), stay target_not_pkcs8
    for tail in (b"\x01" * zeros, bytes(8)):
        with pytest.raises(BadParameterError) as exc:
            KeyMaterial.from_plaintext("EC", SecretBytes(der + tail))
        assert exc.value.reason == "target_not_pkcs8"


# --- crypto ----------------------------------------------------------------------------------


def test_aes_cbc_of_zero_block_is_the_kcv() -> None:
    for size in (16, 24, 32):
        aes = bytes(range(size))
        m = KeyMaterial("oct", aes_key=SecretBytes(aes))
        out = crypto_ops.encrypt(m, f"A{size * 8}CBC", bytes(16), iv=bytes(16)).value
        assert out[:3].hex().upper() == key_check_value(SecretBytes(aes))


def test_crypto_refuses_mismatched_algorithms() -> None:
    m = KeyMaterial("oct", aes_key=SecretBytes(bytes(16)))
    for call in (
        lambda: crypto_ops.encrypt(m, "A256CBC", bytes(16), iv=bytes(16)),
        lambda: crypto_ops.encrypt(m, "A128CBC", bytes(15), iv=bytes(16)),
        lambda: crypto_ops.encrypt(m, "A128CBC", bytes(16)),
        lambda: crypto_ops.sign(m, "RS256", bytes(32)),
        lambda: crypto_ops.wrap_key(m, "RSA-OAEP", bytes(32)),
    ):
        with pytest.raises(BadParameterError):
            call()


# --- service with a fixed clock and randomness ------------------------------------------------


def test_service_with_injected_clock_and_randomness(tmp_path: Path) -> None:
    paths = DataDir(tmp_path / "d")
    paths.create()
    store = KeyStore(paths, Sealer(KEY))
    now = [float(NOW)]
    counter = itertools.count(1)
    service = KeyVaultService(
        store, clock=lambda: now[0], randbytes=lambda n: next(counter).to_bytes(n, "big")
    )

    def call(operation: str, name: str | None = None, body: object = None) -> dict[str, Any]:
        req = ServiceRequest(Route(operation, name=name), host="h:1", api_version="7.6", body=body)
        response = service.handle(req)
        assert response.body is not None
        return response.body

    created = call("create_key", "k", {"kty": "oct-HSM", "key_size": 128})
    assert created["key"]["kid"] == "https://h:1/keys/k/" + "0" * 31 + "2"
    assert created["attributes"]["created"] == NOW
    deleted = call("delete_key", "k")
    assert deleted["scheduledPurgeDate"] == NOW + 7 * 86400
    now[0] += 7 * 86400  # retention over: purged without being asked
    with pytest.raises(KeyNotFoundError):
        call("get_deleted_key", "k")
    assert not (paths.keys_dir / "k.json").exists()
    with pytest.raises(EmulatorError):
        call("get_key", "bad name!")


def _store(root: Path, key: SecretBytes = KEY) -> KeyStore:
    paths = DataDir(root)
    paths.create()
    store = KeyStore(paths, Sealer(key))
    store.load()
    return store


def test_purge_fsyncs_the_keys_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from managed_hsm_emulator import store as store_module

    store = _store(tmp_path / "d")
    service = KeyVaultService(store)
    req = ServiceRequest(Route("create_key", name="p"), host="h:1", api_version="7.6")
    service.handle(replace(req, body={"kty": "oct-HSM", "key_size": 128}))
    synced: list[Path] = []
    monkeypatch.setattr(store_module, "fsync_dir", synced.append)
    store.remove("p")
    assert not (DataDir(tmp_path / "d").keys_dir / "p.json").exists()
    assert synced == [tmp_path / "d" / "keys"]
    store.remove("p")  # nothing left: nothing to sync
    assert synced == [tmp_path / "d" / "keys"]


def _key_file(root: Path, name: str) -> tuple[Path, dict[str, Any]]:
    path = root / "keys" / f"{name}.json"
    return path, json.loads(path.read_text())


@pytest.mark.parametrize(
    "edit",
    [
        lambda v: v.update(key_ops=["encrypt", "decrypt", "wrapKey", "unwrapKey"]),
        lambda v: v.update(kty="oct-HSM"),
        lambda v: v["attributes"].update(enabled=True, exp=None),
        lambda v: v["public"].update(n="AQAB"),
        lambda v: v["tags"].update(owner="mallory"),
        lambda v: v.update(origin="byok"),
    ],
    ids=["key_ops", "kty", "attributes", "public", "tags", "origin"],
)
def test_edited_key_record_is_refused_at_start(tmp_path: Path, edit: Any) -> None:
    store = _store(tmp_path / "d")
    service = KeyVaultService(store, clock=lambda: NOW)
    body = {
        "kty": "RSA-HSM",
        "key_size": 2048,
        "key_ops": ["encrypt"],
        "attributes": {"enabled": False, "exp": NOW + 60},
        "tags": {"owner": "alice"},
    }
    req = ServiceRequest(Route("create_key", name="k"), host="h:1", api_version="7.6", body=body)
    service.handle(req)
    _store(tmp_path / "d")  # untouched: loads
    path, doc = _key_file(tmp_path / "d", "k")
    edit(doc["versions"][0])
    path.write_text(json.dumps(doc))
    with pytest.raises(StartupError) as exc:
        _store(tmp_path / "d")
    assert exc.value.reason == "key_file_tampered"
    assert "k.json" in str(exc.value)
    assert "integrity" in str(exc.value)


def test_record_copied_to_another_name_or_under_another_master_key_is_refused(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path / "d")
    KeyVaultService(store).handle(
        ServiceRequest(
            Route("create_key", name="a"), host="h:1", api_version="7.6", body={"kty": "oct-HSM"}
        )
    )
    path, _ = _key_file(tmp_path / "d", "a")
    with pytest.raises(StartupError) as exc:
        _store(tmp_path / "d", SecretBytes(b"\x02" * 32))
    assert exc.value.reason == "key_file_tampered"
    path.rename(path.with_name("b.json"))
    with pytest.raises(StartupError) as exc:
        _store(tmp_path / "d")
    assert exc.value.reason == "key_file_tampered"
    assert "not of its own name" in str(exc.value)


def test_legacy_key_files_are_upgraded_once_then_a_missing_mac_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(tmp_path / "d")
    KeyVaultService(store).handle(
        ServiceRequest(
            Route("create_key", name="old"), host="h:1", api_version="7.6", body={"kty": "oct-HSM"}
        )
    )
    paths = DataDir(tmp_path / "d")
    assert paths.key_format.read_text() == "2\n"
    path, doc = _key_file(tmp_path / "d", "old")
    legacy = {k: v for k, v in doc.items() if k != "mac"} | {"format": 1}
    # a data directory from before the MAC existed: format 1 files and no marker
    path.write_text(json.dumps(legacy))
    paths.key_format.unlink()
    with caplog.at_level("WARNING", logger="managed_hsm_emulator"):
        upgraded = _store(tmp_path / "d")
    assert "old.json upgraded to format 2" in caplog.text
    assert upgraded.get("old") is not None
    _, doc = _key_file(tmp_path / "d", "old")
    assert doc["format"] == 2
    assert "mac" in doc
    assert paths.key_format.exists()
    # from now on, a downgraded (MAC-less) file is refused like a tampered one
    path.write_text(json.dumps(legacy))
    with pytest.raises(StartupError) as exc:
        _store(tmp_path / "d")
    assert exc.value.reason == "key_file_tampered"


def test_fault_phase_validation() -> None:
    f = FaultInjector()
    assert f.add({"kind": "drop"}).phase == "before"
    assert f.add({"kind": "503", "phase": "after"}).phase == "after"
    assert f.add({"kind": "delay", "delay": 0.1, "phase": "after"}).phase == "after"
    for bad in ("later", None, 1):
        with pytest.raises(BadParameterError) as exc:
            f.add({"kind": "drop", "phase": bad})
        assert exc.value.reason == "bad_fault_rule"


def test_fault_injector_count_and_seeded_rate() -> None:
    f = FaultInjector(seed=7)
    f.add({"kind": "503", "method": "GET", "path": "/keys/*", "count": 2})
    picks = [f.pick("GET", "/keys/a/") for _ in range(3)]
    assert [p.kind if p else None for p in picks] == ["503", "503", None]
    assert f.pick("PUT", "/keys/a") is None
    g1, g2 = FaultInjector(seed=1), FaultInjector(seed=1)
    for g in (g1, g2):
        g.add({"kind": "429", "rate": 0.3})
    draws = [[bool(g.pick("GET", "/x")) for _ in range(50)] for g in (g1, g2)]
    assert draws[0] == draws[1]
    assert 3 <= sum(draws[0]) <= 30


def test_inconsistent_rsa_target_is_refused() -> None:
    from cryptography.hazmat.primitives import serialization

    good = rsa.generate_private_key(65537, 2048).private_numbers()
    bad_d = good.d + 2
    broken = rsa.RSAPrivateNumbers(
        good.p, good.q, bad_d, bad_d % (good.p - 1), bad_d % (good.q - 1), good.iqmp,
        good.public_numbers,
    ).private_key(unsafe_skip_rsa_key_validation=True)  # fmt: skip
    der = broken.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(BadParameterError) as exc:
        KeyMaterial.from_plaintext("RSA", SecretBytes(der))
    assert exc.value.reason == "target_invalid"
    fine = rsa.RSAPrivateNumbers(
        good.p, good.q, good.d, good.dmp1, good.dmq1, good.iqmp, good.public_numbers
    ).private_key()
    fine_der = fine.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert KeyMaterial.from_plaintext("RSA", SecretBytes(fine_der)).key_size == 2048
