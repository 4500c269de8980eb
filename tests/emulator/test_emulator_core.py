"""The pure core without HTTP: tokens, sealing, routes, key-op rules, BYOK unwrap, crypto, and
the service with a fixed clock and deterministic randomness."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from managed_hsm_emulator import crypto_ops
from managed_hsm_emulator.byok import Kek, import_byok
from managed_hsm_emulator.datadir import DataDir
from managed_hsm_emulator.errors import (
    BadParameterError,
    EmulatorError,
    ForbiddenError,
    KeyNotFoundError,
    MethodNotAllowedError,
    PathNotFoundError,
    UnauthorizedError,
)
from managed_hsm_emulator.faults import FaultInjector
from managed_hsm_emulator.material import KeyMaterial
from managed_hsm_emulator.model import KeyAttributes, KeyVersion, check_key_ops
from managed_hsm_emulator.routes import Route, route
from managed_hsm_emulator.sealing import Sealer, SealError
from managed_hsm_emulator.service import KeyVaultService, ServiceRequest
from managed_hsm_emulator.store import KeyStore
from managed_hsm_emulator.tokens import AUDIENCE, mint_token, verify_token
from offline_packager.kid import KeyId
from offline_packager.package_format import b64url_encode, encode_package
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


@settings(max_examples=60, deadline=None)
@given(position=st.integers(min_value=0), replacement=st.sampled_from("ABCxyz019-_."))
def test_any_change_to_a_token_is_rejected(position: int, replacement: str) -> None:
    token = mint_token(KEY, audience=AUDIENCE, issued_at=NOW, lifetime_seconds=3600)
    i = position % len(token)
    if token[i] == replacement:
        return
    changed = token[:i] + replacement + token[i + 1 :]
    with pytest.raises(UnauthorizedError):
        verify_token(KEY, changed, now=NOW)


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
    args = {"host": "hsm.example:8443", "find_kek": _find(kek), "now": NOW}
    material = import_byok(key_hsm, family="oct", crv=None, **args)  # type: ignore[arg-type]  # test dict
    assert material.aes_key is not None
    assert material.aes_key.reveal() == aes
    assert "redacted" in repr(material)
    with pytest.raises(BadParameterError) as exc:
        import_byok(key_hsm, family="oct", crv=None, **{**args, "host": "other:1"})  # type: ignore[arg-type]  # test dict
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
