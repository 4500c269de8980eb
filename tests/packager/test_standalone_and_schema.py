"""The packager stands alone (no azure.*), writes schema-valid manifests, and leaks nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from packager_support import pkcs8, plaintext_forms, write_key_file
from testsupport import REPO, make_kid, write_kek

from offline_packager.keytypes import TYPE_NAMES
from offline_packager.secret import SecretBytes
from offline_packager.target_keys import generate_target

SCHEMA = json.loads((REPO / "offline_packager" / "schemas" / "manifest.schema.json").read_text())


def test_packager_runs_without_azure(keks: dict[int, rsa.RSAPrivateKey], tmp_path: Path) -> None:
    pem, _ = write_kek(tmp_path, keks[2048])
    code = (
        "import sys, runpy\n"
        "sys.argv = ['byok-package', 'wrap', '--kek', sys.argv[1], '--kek-kid', sys.argv[2],"
        " '--generate', 'ec-p256', '--out', sys.argv[3]]\n"
        "try:\n    runpy.run_module('offline_packager', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "bad = sorted(m for m in sys.modules if m == 'azure' or m.startswith('azure.'))\n"
        "print('AZURE:' + ','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(pem), make_kid(), str(tmp_path / "k.byok")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert "AZURE:\n" in out.stdout
    assert (tmp_path / "k.byok").is_file()


def test_packager_source_imports_only_allowed_modules() -> None:
    allowed_third_party = {"cryptography", "pkcs11"}
    for path in (REPO / "offline_packager").glob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")) and not stripped.startswith("from ."):
                top = stripped.split()[1].split(".")[0]
                assert top in sys.stdlib_module_names or top in allowed_third_party, (path, line)


@pytest.mark.parametrize("type_name", TYPE_NAMES)
def test_manifest_matches_schema(
    type_name: str, keks: dict[int, rsa.RSAPrivateKey], tmp_path: Path
) -> None:
    from offline_packager.cli import main

    pem, _ = write_kek(tmp_path, keks[3072])
    assert main(["wrap", "--kek", str(pem), "--kek-kid", make_kid(), "--generate", type_name,
                 "--out", str(tmp_path / "k.byok")]) == 0  # fmt: skip
    doc = json.loads((tmp_path / "k.manifest.json").read_text())
    jsonschema.validate(doc, SCHEMA, format_checker=jsonschema.FormatChecker())
    assert doc["target"]["type"] == type_name


def test_schema_rejects_a_manifest_with_a_secret_field() -> None:
    doc = {"schema_version": "1.0", "target": {"d": "secret"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMA)


def test_secret_wrappers_never_show_material() -> None:
    raw = bytes(range(32))
    secret = SecretBytes(raw, label="target")
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}"):
        assert raw.hex() not in text
        assert "redacted" in text
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(secret)
    key = generate_target("oct-256")
    assert key.plaintext.reveal().hex() not in repr(key)
    secret.wipe()
    assert len(secret) == 0


@pytest.mark.parametrize("fmt", ["pkcs8-pem", "jwk"])
def test_no_plaintext_in_any_output(
    fmt: str, keks: dict[int, rsa.RSAPrivateKey], tmp_path: Path
) -> None:
    """Run the CLI in a subprocess; scan its stdout, stderr and every file it left."""
    pem, _ = write_kek(tmp_path, keks[2048])
    key = ec.generate_private_key(ec.SECP384R1())
    key_file = tmp_path / "in" / "target.key"
    key_file.parent.mkdir()
    write_key_file(key_file, key, fmt)
    secret_forms = plaintext_forms(pkcs8(key)) + plaintext_forms(
        key.private_numbers().private_value.to_bytes(48, "big")
    )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "offline_packager", "wrap", "--kek", str(pem), "--kek-kid",
         make_kid(), "--key", str(key_file), "--out", str(out_dir / "t.byok"), "--json"],
        check=True, capture_output=True,
    )  # fmt: skip
    blobs = [proc.stdout, proc.stderr] + [p.read_bytes() for p in out_dir.iterdir()]
    assert len(blobs) == 4  # .byok and manifest, nothing else
    for blob in blobs:
        for form in secret_forms:
            assert form[:16] not in blob
