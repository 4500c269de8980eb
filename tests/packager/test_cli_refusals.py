"""Every refusal: exit code 2, the reason on one stderr line, and no output file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from packager_support import write_key_file
from testsupport import make_kid, write_kek

from offline_packager.cli import main

Setup = Callable[[Path], list[str]]


@pytest.fixture(scope="module")
def rsa1024() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 1024)  # noqa: S505  # the weak size is what is refused


def _pem_pub(path: Path, key: object) -> Path:
    path.write_bytes(
        key.public_bytes(  # type: ignore[attr-defined]  # any cryptography public key
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def _key(path: Path, key: object, fmt: str = "pkcs8-pem") -> Path:
    write_key_file(path, key, fmt)  # type: ignore[arg-type]  # any private key type
    return path


CASES: dict[str, tuple[str, Callable[[Path, dict[str, Any]], list[str]]]] = {
    "rsa-1024 target": (
        "unsupported_target",
        lambda t, k: ["--key", str(_key(t / "t.pem", k["rsa1024"]))],
    ),
    "ed25519 target": (
        "unsupported_target",
        lambda t, k: ["--key", str(_key(t / "t.pem", ed25519.Ed25519PrivateKey.generate()))],
    ),
    "secp224r1 curve": (
        "unsupported_curve",
        lambda t, k: ["--key", str(_key(t / "t.pem", ec.generate_private_key(ec.SECP224R1())))],
    ),
    "brainpool curve via jwk": (
        "unsupported_curve",
        lambda t, k: ["--key", str(_write(t / "t.jwk", b'{"kty":"EC","crv":"BP-256","d":"AA"}'))],
    ),
    "aes-40 raw": (
        "unsupported_target",
        lambda t, k: ["--key", str(_write(t / "a", b"12345")), "--key-type", "oct"],
    ),
    "public key as target": (
        "bad_key_file",
        lambda t, k: ["--key", str(_pem_pub(t / "p.pem", k["kek2048"].public_key()))],
    ),
    "garbage target": (
        "bad_key_file",
        lambda t, k: ["--key", str(_write(t / "g", b"\x00garbage"))],
    ),
    "missing target file": ("unreadable_input", lambda t, k: ["--key", str(t / "nope.pem")]),
    "wrong passphrase": (
        "bad_passphrase",
        lambda t, k: ["--key", str(_enc(t, k)), "--passphrase-env", "WRONG_PASS"],
    ),
    "ec kek": (
        "kek_not_rsa",
        lambda t, k: [
            "--generate",
            "oct-256",
            "!kek",
            str(_pem_pub(t / "e.pem", ec.generate_private_key(ec.SECP256R1()).public_key())),
        ],
    ),
    "dsa kek": (
        "kek_not_rsa",
        lambda t, k: [
            "--generate",
            "oct-256",
            "!kek",
            str(_pem_pub(t / "d.pem", dsa.generate_private_key(2048).public_key())),
        ],
    ),
    "rsa-1024 kek": (
        "kek_wrong_size",
        lambda t, k: [
            "--generate",
            "oct-256",
            "!kek",
            str(_pem_pub(t / "s.pem", k["rsa1024"].public_key())),
        ],
    ),
    "malformed kek pem": (
        "malformed_pem",
        lambda t, k: [
            "--generate",
            "oct-256",
            "!kek",
            str(
                _write(t / "m.pem", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
            ),
        ],
    ),
    "private key as kek": (
        "malformed_pem",
        lambda t, k: ["--generate", "oct-256", "!kek", str(_key(t / "pk.pem", k["kek2048"]))],
    ),
    "versionless kid": (
        "bad_kid",
        lambda t, k: ["--generate", "oct-256", "!kid", "https://h.managedhsm.azure.net/keys/kek"],
    ),
    "malformed kid": ("bad_kid", lambda t, k: ["--generate", "oct-256", "!kid", "not a url"]),
    "fingerprint mismatch": (
        "kek_fingerprint_mismatch",
        lambda t, k: ["--generate", "oct-256", "--kek-sha256", "00" * 32],
    ),
    "malformed fingerprint": (
        "bad_fingerprint",
        lambda t, k: ["--generate", "oct-256", "--kek-sha256", "xyz"],
    ),
    "existing output": ("output_exists", lambda t, k: ["--generate", "oct-256", "!exists"]),
    "bad output name": (
        "bad_output_name",
        lambda t, k: ["--generate", "oct-256", "!out", str(t / "bad_name.byok")],
    ),
    "bad key ops": (
        "bad_key_ops",
        lambda t, k: ["--generate", "ec-p256", "--key-ops", "sign,decrypt"],
    ),
    "import op on target": (
        "bad_key_ops",
        lambda t, k: ["--generate", "rsa-2048", "--key-ops", "import"],
    ),
    "no key source": ("bad_arguments", lambda t, k: []),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _enc(tmp: Path, keys: dict[str, Any]) -> Path:
    path = tmp / "enc.pem"
    write_key_file(path, ec.generate_private_key(ec.SECP256R1()), "encrypted-pem", b"right")
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_refusal(
    case: str,
    keks: dict[int, rsa.RSAPrivateKey],
    rsa1024: rsa.RSAPrivateKey,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WRONG_PASS", "wrong")
    reason, build = CASES[case]
    kek_pem, _ = write_kek(tmp_path, keks[2048])
    out = tmp_path / "out" / "target.byok"
    out.parent.mkdir()
    argv = build(tmp_path, {"rsa1024": rsa1024, "kek2048": keks[2048]})
    opts = {"--kek": str(kek_pem), "--kek-kid": make_kid(), "--out": str(out)}
    extra: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "!kek":
            opts["--kek"] = next(it)
        elif arg == "!kid":
            opts["--kek-kid"] = next(it)
        elif arg == "!out":
            opts["--out"] = next(it)
        elif arg == "!exists":
            out.write_bytes(b"precious")
        else:
            extra.append(arg)
    before = sorted(p.name for p in out.parent.iterdir())
    rc = main(["wrap", *[x for kv in opts.items() for x in kv], *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"[{reason}]" in err, err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("byok-package: warning:")]
    assert len(lines) == 1  # one line: the reason
    assert sorted(p.name for p in out.parent.iterdir()) == before  # nothing written
    if case == "existing output":
        assert out.read_bytes() == b"precious"


def test_force_replaces_existing_output(keks: dict[int, rsa.RSAPrivateKey], tmp_path: Path) -> None:
    kek_pem, _ = write_kek(tmp_path, keks[2048])
    out = tmp_path / "k.byok"
    out.write_bytes(b"old")
    args = ["wrap", "--kek", str(kek_pem), "--kek-kid", make_kid(), "--out", str(out)]
    assert main([*args, "--generate", "oct-128"]) == 2
    assert main([*args, "--generate", "oct-128", "--force"]) == 0
    assert out.read_bytes() != b"old"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_json_refusal_is_machine_readable(
    keks: dict[int, rsa.RSAPrivateKey], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    kek_pem, _ = write_kek(tmp_path, keks[2048])
    rc = main(["wrap", "--kek", str(kek_pem), "--kek-kid", "https://x/keys/k", "--generate",
               "oct-128", "--out", str(tmp_path / "k.byok"), "--json"])  # fmt: skip
    assert rc == 2
    assert json.loads(capsys.readouterr().out)["reason"] == "bad_kid"
