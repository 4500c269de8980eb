"""``byok-package wrap-batch``: many keys under one KEK, each package exactly as ``wrap`` makes
it (unwrapped with `cryptography` and the OpenSSL CLI), the same refusals per key without
stopping the batch, a stable JSON summary, nothing partial after a refusal or an interrupt, and
no key material in any output."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from packager_support import openssl_unwrap, pkcs8, plaintext_forms, write_key_file
from testsupport import REPO, make_kid, write_kek

from offline_packager.batch import KEY_FIELDS
from offline_packager.cli import main
from offline_packager.kek import spki_sha256
from offline_packager.package_format import b64url_encode, parse_package
from offline_packager.secret import SecretBytes
from offline_packager.target_keys import key_check_value
from offline_packager.wrap import oaep_sha1, unwrap_target

SCHEMAS = REPO / "offline_packager" / "schemas"
SUMMARY_SCHEMA = json.loads((SCHEMAS / "batch-summary.schema.json").read_text())
MANIFEST_SCHEMA = json.loads((SCHEMAS / "manifest.schema.json").read_text())
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
README_MARKER = "# wrap-batch-example"


class Tty(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def kek(keks: dict[int, rsa.RSAPrivateKey], tmp_path: Path) -> dict[str, Any]:
    """A 3072-bit KEK: its PEM file, private key (to unwrap), kid and SPKI SHA-256."""
    pem, priv = write_kek(tmp_path, keks[3072])
    private = keks[3072]
    return {"pem": pem, "private_pem": priv, "private": private, "kid": make_kid(),
            "sha256": spki_sha256(private.public_key())}  # fmt: skip


def _argv(kek: dict[str, Any], out: Path, *extra: str) -> list[str]:
    return ["wrap-batch", "--kek", str(kek["pem"]), "--kek-kid", kek["kid"],
            "--kek-sha256", kek["sha256"], "--out-dir", str(out), *extra]  # fmt: skip


def _batch(
    capsys: pytest.CaptureFixture[str], argv: list[str], *, expect: int
) -> tuple[dict[str, Any], str]:
    """Run ``wrap-batch --json`` in-process: the summary (schema-checked) and stderr."""
    rc = main([*argv, "--json"], clock=lambda: NOW)
    captured = capsys.readouterr()
    assert rc == expect, captured.err
    summary: dict[str, Any] = json.loads(captured.out)
    if "summary_version" in summary:
        jsonschema.validate(summary, SUMMARY_SCHEMA)
    return summary, captured.err


def _by_name(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k["name"]: k for k in summary["keys"]}


def _key_folder(folder: Path, keks: dict[int, rsa.RSAPrivateKey]) -> dict[str, bytes]:
    """Key files in every input format; the plaintext each must unwrap to, by key name."""
    folder.mkdir()
    expected: dict[str, bytes] = {}
    files: dict[str, tuple[PrivateKeyTypes, str]] = {
        "payments-2026.pem": (ec.generate_private_key(ec.SECP256R1()), "traditional-pem"),
        "signing.der": (ec.generate_private_key(ec.SECP384R1()), "pkcs8-der"),
        "p521.jwk": (ec.generate_private_key(ec.SECP521R1()), "jwk"),
        "locked.pem": (ec.generate_private_key(ec.SECP256K1()), "encrypted-pem"),
        "rsa-target.key": (keks[2048], "pkcs8-pem"),
    }
    for file_name, (key, fmt) in files.items():
        write_key_file(folder / file_name, key, fmt, passphrase=b"batch pass")
        expected[file_name.split(".")[0]] = pkcs8(key)
    (folder / "aes-a.bin").write_bytes(raw := os.urandom(32))
    expected["aes-a"] = raw
    (folder / "aes-b.json").write_text(json.dumps({"kty": "oct", "k": b64url_encode(b"k" * 16)}))
    expected["aes-b"] = b"k" * 16
    (folder / "README.txt").write_text("the custodian's notes: not a key")
    (folder / "old").mkdir()
    (folder / ".hidden.pem").write_text("an editor's backup: never read")
    return expected


@pytest.mark.skipif(shutil.which("openssl") is None, reason="make test installs openssl")
def test_files_and_generated_keys_are_all_wrapped_and_unwrap_exactly(
    kek: dict[str, Any],
    keks: dict[int, rsa.RSAPrivateKey],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BATCH_PASS", "batch pass")
    expected = _key_folder(tmp_path / "keys", keks)
    out = tmp_path / "out"
    out.mkdir()
    summary, err = _batch(capsys, _argv(kek, out, "--keys", str(tmp_path / "keys"),
                          "--generate", "ec-p256:3", "--generate", "oct-256:2",
                          "--generate", "ec-p256", "--passphrase-env", "BATCH_PASS"), expect=0)  # fmt: skip
    assert not err
    assert summary["status"] == "ok"
    generated = ["gen-ec-p256-1", "gen-ec-p256-2", "gen-ec-p256-3", "gen-oct-256-1",
                 "gen-oct-256-2", "gen-ec-p256-4"]  # fmt: skip
    assert [k["name"] for k in summary["keys"]] == sorted(expected) + generated
    assert summary["totals"] == {"keys": 13, "wrapped": 13, "refused": 0, "not_attempted": 0}
    assert sorted(Path(p).name for p in summary["ignored_files"]) == ["README.txt", "old"]
    assert (summary["kek_kid"], summary["kek_spki_sha256"]) == (kek["kid"], kek["sha256"])
    assert len(list(out.iterdir())) == 26  # a package and a manifest per key, nothing else
    for entry in summary["keys"]:
        package, manifest_path = Path(entry["package"]), Path(entry["manifest"])
        assert (package.name, manifest_path.name) == (f"{entry['name']}.byok",
                                                      f"{entry['name']}.manifest.json")  # fmt: skip
        assert entry["package_sha256"] == hashlib.sha256(package.read_bytes()).hexdigest()
        manifest = json.loads(manifest_path.read_text())
        jsonschema.validate(manifest, MANIFEST_SCHEMA, format_checker=jsonschema.FormatChecker())
        assert manifest["target"]["type"] == entry["target_type"]
        assert manifest["target"]["fingerprint"] == entry["fingerprint"]
        assert manifest["kek"]["kid"] == kek["kid"]
        plain = unwrap_target(kek["private"], parse_package(package.read_bytes()).ciphertext)
        if entry["name"] in expected:
            assert plain.reveal() == expected[entry["name"]]
            assert openssl_unwrap(package, kek["private_pem"], 384, tmp_path) == plain.reveal()
            assert manifest["generator"]["key_source"] == {"kind": "software-file"}
        else:
            assert manifest["generator"]["key_source"] == {"kind": "software-generated"}
            _check_generated(plain, manifest)


def _check_generated(plain: SecretBytes, manifest: dict[str, Any]) -> None:
    """A generated key's plaintext is the key its manifest describes."""
    if manifest["target"]["type"].startswith("oct-"):
        assert manifest["target"]["fingerprint"]["value"] == key_check_value(plain)
        return
    key = serialization.load_der_private_key(plain.reveal(), None)
    assert pkcs8(key) == plain.reveal()
    assert manifest["target"]["fingerprint"]["value"] == spki_sha256(key.public_key())


def test_a_batch_package_is_what_wrap_writes(
    kek: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same key file, same clock: the manifests are equal but for the package's SHA-256 (a
    fresh AES key per package), and the packages differ only in their ciphertext."""
    keys, by_wrap, by_batch = tmp_path / "keys", tmp_path / "wrap", tmp_path / "batch"
    for folder in (keys, by_wrap, by_batch):
        folder.mkdir()
    write_key_file(keys / "payments.pem", ec.generate_private_key(ec.SECP256R1()), "pkcs8-pem")
    wrap_argv = ["wrap", "--kek", str(kek["pem"]), "--kek-kid", kek["kid"], "--kek-sha256",
                 kek["sha256"], "--key", str(keys / "payments.pem"),
                 "--out", str(by_wrap / "payments.byok")]  # fmt: skip
    assert main(wrap_argv, clock=lambda: NOW) == 0
    capsys.readouterr()
    _batch(capsys, _argv(kek, by_batch, "--keys", str(keys)), expect=0)
    manifests = [
        json.loads((d / "payments.manifest.json").read_text()) for d in (by_wrap, by_batch)
    ]
    packages = [json.loads((d / "payments.byok").read_text()) for d in (by_wrap, by_batch)]
    for manifest in manifests:
        del manifest["package"]["sha256"]
    assert manifests[0] == manifests[1]
    assert packages[0]["ciphertext"] != packages[1]["ciphertext"]
    for package in packages:
        del package["ciphertext"]
    assert packages[0] == packages[1]


def test_refused_keys_do_not_stop_the_batch(
    kek: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys, out = tmp_path / "keys", tmp_path / "out"
    keys.mkdir()
    out.mkdir()
    p256 = ec.generate_private_key(ec.SECP256R1())
    write_key_file(keys / "good.pem", p256, "pkcs8-pem")
    write_key_file(keys / "bad_name.pem", p256, "pkcs8-pem")
    write_key_file(keys / "ed.pem", ed25519.Ed25519PrivateKey.generate(), "pkcs8-pem")
    weak = rsa.generate_private_key(65537, 1024)  # noqa: S505  # the weak size is what is refused
    write_key_file(keys / "weak.pem", weak, "pkcs8-pem")
    write_key_file(keys / "curve.pem", ec.generate_private_key(ec.SECP224R1()), "pkcs8-pem")
    (keys / "public.pem").write_bytes(
        p256.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (keys / "garbage.der").write_bytes(b"\x00garbage")
    (keys / "aes-40.bin").write_bytes(b"12345")
    write_key_file(keys / "twice.pem", p256, "pkcs8-pem")
    write_key_file(keys / "Twice.der", p256, "pkcs8-der")
    write_key_file(keys / "locked.pem", p256, "encrypted-pem", passphrase=b"unknown")
    write_key_file(keys / "existing.pem", p256, "pkcs8-pem")
    (out / "existing.byok").write_bytes(b"precious")
    summary, err = _batch(
        capsys, _argv(kek, out, "--keys", str(keys), "--generate", "ec-p256:2"), expect=2
    )
    reasons = {name: entry["reason"] for name, entry in _by_name(summary).items()}
    assert reasons == {
        "Twice": "duplicate_key_name",
        "aes-40": "unsupported_target",
        "bad_name": "bad_key_name",
        "curve": "unsupported_curve",
        "ed": "unsupported_target",
        "existing": "output_exists",
        "garbage": "bad_key_file",
        "good": None,
        "locked": "bad_passphrase",
        "public": "bad_key_file",
        "twice": "duplicate_key_name",
        "weak": "unsupported_target",
        "gen-ec-p256-1": None,
        "gen-ec-p256-2": None,
    }
    assert summary["status"] == "refused"
    assert summary["totals"] == {"keys": 14, "wrapped": 3, "refused": 11, "not_attempted": 0}
    lines = err.strip().splitlines()
    refused = [name for name, reason in reasons.items() if reason]
    assert len(lines) == len(refused)  # one line per refused key, nothing else
    for name in refused:
        assert sum(line.startswith(f"byok-package: refused [{reasons[name]}]: {name}: ")
                   for line in lines) == 1  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "existing.byok", "gen-ec-p256-1.byok", "gen-ec-p256-1.manifest.json",
        "gen-ec-p256-2.byok", "gen-ec-p256-2.manifest.json", "good.byok", "good.manifest.json",
    ]  # fmt: skip
    assert (out / "existing.byok").read_bytes() == b"precious"
    # --force replaces the existing package, as `wrap --force` does
    _batch(capsys, _argv(kek, out, "--keys", str(keys), "--force"), expect=2)
    assert (out / "existing.byok").read_bytes() != b"precious"


CSV = """\
# the custodian's list: name, file (relative to this list), type it must be, key operations
name,key_file,pkcs11_label,type,key_ops
payments-2026,keys/a.pem,,ec-p256,sign verify
aes-2026,keys/k.bin,,OCT-256,"encrypt,decrypt"

wrong-type,keys/a.pem,,ec-p384,
both,keys/a.pem,some-label,,
unknown-type,keys/a.pem,,ec-p999,
bad-ops,keys/a.pem,,,decrypt
missing,keys/nope.pem,,,
unquoted,keys/a.pem,,,sign,verify
"""


def test_a_csv_key_list(
    kek: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "list" / "keys").mkdir(parents=True)
    write_key_file(tmp_path / "list" / "keys" / "a.pem", ec.generate_private_key(ec.SECP256R1()),
                   "pkcs8-pem")  # fmt: skip
    (tmp_path / "list" / "keys" / "k.bin").write_bytes(os.urandom(32))
    (tmp_path / "list" / "keys.csv").write_text(CSV)
    out = tmp_path / "out"
    out.mkdir()
    summary, _ = _batch(capsys, _argv(kek, out, "--keys", str(tmp_path / "list" / "keys.csv")),
                        expect=2)  # fmt: skip
    keys = _by_name(summary)
    assert {n: k["reason"] for n, k in keys.items()} == {
        "payments-2026": None,
        "aes-2026": None,
        "wrong-type": "target_type_mismatch",
        "both": "bad_batch_row",
        "unknown-type": "bad_batch_row",
        "bad-ops": "bad_key_ops",
        "missing": "unreadable_input",
        "unquoted": "bad_batch_row",
    }
    assert keys["payments-2026"]["key_ops"] == ["sign", "verify"]
    assert keys["aes-2026"]["key_ops"] == ["encrypt", "decrypt"]
    assert keys["aes-2026"]["target_type"] == "oct-256"
    assert keys["wrong-type"]["source"].endswith("keys.csv line 6")
    manifest = json.loads((out / "aes-2026.manifest.json").read_text())
    assert manifest["target"]["key_ops"] == ["encrypt", "decrypt"]
    assert sorted(p.name for p in out.iterdir()) == [
        "aes-2026.byok", "aes-2026.manifest.json", "payments-2026.byok",
        "payments-2026.manifest.json",
    ]  # fmt: skip


BATCH_REFUSALS: dict[str, tuple[str, list[str]]] = {
    "fingerprint mismatch": ("kek_fingerprint_mismatch", ["--kek-sha256", "00" * 32]),
    "versionless kid": ("bad_kid", ["--kek-kid", "https://h.managedhsm.azure.net/keys/kek"]),
    "no output folder": ("output_unwritable", ["--out-dir", "{tmp}/nowhere"]),
    "nothing to wrap": ("bad_arguments", ["--keys", "{tmp}/empty"]),
    "no keys at all": ("bad_arguments", ["--generate-none"]),
    "labels without a token": ("bad_arguments", ["--labels", "a,b"]),
    "output folder is the key folder": ("bad_arguments", ["--keys", "{tmp}/out"]),
    "bad name prefix": ("bad_arguments", ["--name-prefix", "no_underscores"]),
    "keys neither folder nor csv": ("bad_arguments", ["--keys", "{tmp}/list.txt"]),
    "keys missing": ("unreadable_input", ["--keys", "{tmp}/absent.csv"]),
    "csv unknown column": ("bad_batch_list", ["--keys", "{tmp}/typo.csv"]),
    "csv without header": ("bad_batch_list", ["--keys", "{tmp}/comments.csv"]),
    "csv token labels without a token": ("bad_arguments", ["--keys", "{tmp}/token.csv"]),
    "attestation test root alone": ("bad_arguments", ["--trust-test-root", "{tmp}/list.txt"]),
}


@pytest.mark.parametrize("case", list(BATCH_REFUSALS))
def test_a_batch_refused_as_a_whole_writes_nothing(
    case: str, kek: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reason, extra = BATCH_REFUSALS[case]
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "list.txt").write_text("a.pem\n")
    (tmp_path / "typo.csv").write_text("name,key_fle\na,a.pem\n")
    (tmp_path / "comments.csv").write_text("# nothing but a comment\n\n")
    (tmp_path / "token.csv").write_text("name,pkcs11_label\nsigning,signing-key\n")
    argv = _argv(kek, out, *(a.format(tmp=tmp_path) for a in extra))
    if "--generate-none" not in extra and not {"--keys", "--labels"} & set(extra):
        argv += ["--generate", "oct-128:2"]
    argv = [a for a in argv if a != "--generate-none"]
    refusal, err = _batch(capsys, argv, expect=2)
    assert refusal["reason"] == reason
    assert [line for line in err.splitlines() if "warning" not in line] == [
        f"byok-package: refused [{reason}]: {refusal['message']}"
    ]
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("value", ["ec-p256:0", "ec-p999:2", "oct-256:many", "oct-256:5001"])
def test_a_bad_generate_is_a_usage_error(
    value: str, kek: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_argv(kek, tmp_path, "--generate", value)) == 2
    err = capsys.readouterr().err
    assert "argument --generate" in err
    assert len(err.splitlines()) == 1  # one line, as every error


def test_the_json_summary_has_a_stable_shape(
    kek: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "x-oct-128-1.byok").write_bytes(b"in the way")
    summary, _ = _batch(capsys, _argv(kek, out, "--generate", "oct-128:2", "--name-prefix", "x"),
                        expect=2)  # fmt: skip
    assert list(summary) == ["summary_version", "status", "out_dir", "kek_kid",
                             "kek_spki_sha256", "kek_attestation", "totals", "seconds", "keys",
                             "ignored_files"]  # fmt: skip
    assert summary["summary_version"] == 1
    assert list(summary["totals"]) == ["keys", "wrapped", "refused", "not_attempted"]
    assert KEY_FIELDS == ("name", "source", "status", "reason", "message", "target_type",
                          "key_ops", "fingerprint", "package", "manifest", "package_sha256")  # fmt: skip
    refused, wrapped = summary["keys"]
    assert list(refused) == list(KEY_FIELDS) == list(wrapped)
    assert refused == {"name": "x-oct-128-1", "source": "generated oct-128", "status": "refused",
                       "reason": "output_exists",
                       "message": f"{out / 'x-oct-128-1.byok'} exists; use --force to replace it",
                       "target_type": None, "key_ops": None, "fingerprint": None,
                       "package": None, "manifest": None, "package_sha256": None}  # fmt: skip
    assert wrapped["status"] == "wrapped"
    assert (wrapped["reason"], wrapped["message"]) == (None, None)
    assert wrapped["fingerprint"]["kind"] == "kcv"
    assert wrapped["key_ops"] == ["encrypt", "decrypt", "wrapKey", "unwrapKey"]


def _fail_link(monkeypatch: pytest.MonkeyPatch, at: int, error: BaseException) -> list[str]:
    """Make the ``at``-th ``os.link`` (atomic.py links each file into place) raise ``error``;
    the names linked so far, the failing one last."""
    real_link = os.link
    calls: list[str] = []

    def link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(Path(dst).name)
        if len(calls) == at:
            raise error
        real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", link)
    return calls


def test_an_interrupt_leaves_complete_pairs_and_nothing_partial(
    kek: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C between the second key's package and its manifest: the package is removed, the
    first key's pair stays, the rest is not attempted; exit 130."""
    calls = _fail_link(monkeypatch, 4, KeyboardInterrupt())
    out = tmp_path / "out"
    out.mkdir()
    summary, err = _batch(capsys, _argv(kek, out, "--generate", "oct-256:4"), expect=130)
    assert calls[-2:] == ["gen-oct-256-2.byok", "gen-oct-256-2.manifest.json"]  # half a pair
    assert summary["status"] == "interrupted"
    assert summary["totals"] == {"keys": 4, "wrapped": 1, "refused": 1, "not_attempted": 2}
    assert [(k["name"], k["reason"]) for k in summary["keys"]] == [
        ("gen-oct-256-1", None), ("gen-oct-256-2", "interrupted")
    ]  # fmt: skip
    assert "interrupted" in err
    assert sorted(p.name for p in out.iterdir()) == ["gen-oct-256-1.byok",
                                                     "gen-oct-256-1.manifest.json"]  # fmt: skip


def test_a_failed_write_refuses_that_key_only_and_leaves_no_half_pair(
    kek: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first key's manifest cannot be linked after its package was: that key is refused
    and its package removed; the second key is wrapped."""
    _fail_link(monkeypatch, 2, OSError(errno.EIO, "Input/output error"))
    out = tmp_path / "out"
    out.mkdir()
    summary, _ = _batch(capsys, _argv(kek, out, "--generate", "ec-p256:2"), expect=2)
    assert [k["reason"] for k in summary["keys"]] == ["output_unwritable", None]
    assert sorted(p.name for p in out.iterdir()) == ["gen-ec-p256-2.byok",
                                                     "gen-ec-p256-2.manifest.json"]  # fmt: skip


def test_no_key_material_in_any_output(kek: dict[str, Any], tmp_path: Path) -> None:
    """A real process: its stdout, stderr and every file it left hold neither a target's
    plaintext (from a file or generated) nor any package's ephemeral AES key."""
    keys, out = tmp_path / "keys", tmp_path / "out"
    keys.mkdir()
    out.mkdir()
    file_key = ec.generate_private_key(ec.SECP384R1())
    write_key_file(keys / "from-file.pem", file_key, "pkcs8-pem")
    (keys / "aes-file.bin").write_bytes(aes_raw := os.urandom(32))
    write_key_file(keys / "bad_name.pem", file_key, "jwk")  # refused: its message too
    proc = subprocess.run(
        [sys.executable, "-m", "offline_packager", *_argv(kek, out, "--keys", str(keys),
         "--generate", "ec-p256:2", "--generate", "oct-256:2", "--json")],
        capture_output=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    secrets = [pkcs8(file_key), aes_raw,
               file_key.private_numbers().private_value.to_bytes(48, "big")]  # fmt: skip
    packages = sorted(out.glob("*.byok"))
    assert len(packages) == 6
    for package in packages:
        ciphertext = parse_package(package.read_bytes()).ciphertext
        secrets.append(unwrap_target(kek["private"], ciphertext).reveal())
        secrets.append(kek["private"].decrypt(ciphertext[:384], oaep_sha1()))  # the AES key
    blobs = {"stdout": proc.stdout, "stderr": proc.stderr}
    blobs |= {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and keys not in p.parents}  # fmt: skip
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left
    for where, blob in blobs.items():
        for secret in secrets:
            for form in plaintext_forms(secret):
                assert form[:16] not in blob, where


def test_a_progress_line_only_on_a_terminal(
    kek: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert main(_argv(kek, out, "--generate", "oct-128:3", "--name-prefix", "plain")) == 0
    assert "\r" not in capsys.readouterr().err  # not a terminal: no progress line
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(_argv(kek, out, "--generate", "oct-128:3", "--name-prefix", "tty")) == 0
    shown = tty.getvalue()
    assert shown.startswith("\r")
    assert "\rbyok-package wrap-batch: 3/3 keys, 3 wrapped, 0 refused" in shown
    assert shown.endswith("\n")
    text = capsys.readouterr().out
    assert "3 of 3 keys wrapped, 0 refused" in text
    assert "wrapped  tty-oct-128-1  oct-128  SHA-256 " in text


def _readme_commands() -> list[list[str]]:
    """The commands of the README's "Many keys at once" block (comments dropped)."""
    text = (REPO / "README.md").read_text()
    block = text.split(README_MARKER + "\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def test_the_readme_commands_run(
    kek: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(kek["pem"], tmp_path / "KEK.pem")
    (tmp_path / "keys").mkdir()
    write_key_file(tmp_path / "keys" / "payments-2026.pem", ec.generate_private_key(ec.SECP256R1()),
                   "pkcs8-pem")  # fmt: skip
    (tmp_path / "keys" / "backup-aes.bin").write_bytes(os.urandom(32))
    (tmp_path / "keys.csv").write_text(
        "name,key_file,type,key_ops\nsigning-2026,keys/payments-2026.pem,ec-p256,sign\n"
    )
    (tmp_path / "packages").mkdir()
    commands = _readme_commands()
    assert commands
    assert all(c[:2] == ["byok-package", "wrap-batch"] for c in commands)
    for command in commands:
        argv = [{"KID": kek["kid"], "SHA256": kek["sha256"]}.get(a, a) for a in command[1:]]
        assert main(argv) == 0, capsys.readouterr().err
    names = sorted(p.name.removesuffix(".byok") for p in (tmp_path / "packages").glob("*.byok"))
    assert {"payments-2026", "backup-aes", "signing-2026"} <= set(names)


def test_a_plain_wrap_loads_no_approval_attestation_or_token_code(
    kek: dict[str, Any], tmp_path: Path
) -> None:
    """Start-up: `wrap` without an attestation imports neither x509, the approvals' JWS code,
    the package checks, python-pkcs11 nor the batch modules (they load where used)."""
    code = (
        "import sys, runpy\n"
        "sys.argv = ['byok-package', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('offline_packager', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    argv = ["wrap", "--kek", str(kek["pem"]), "--kek-kid", kek["kid"], "--generate", "ec-p256",
            "--out", str(tmp_path / "k.byok")]  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True,
                         text=True)  # fmt: skip
    loaded = set(out.stdout.split())
    assert "offline_packager.wrap" in loaded
    lazy = {"cryptography.x509", "offline_packager.approval", "offline_packager.attestation",
            "offline_packager.checks", "offline_packager.batch", "offline_packager.batch_sources",
            "offline_packager.pkcs11_source", "pkcs11", "logging", "getpass", "csv"}  # fmt: skip
    assert not lazy & loaded
