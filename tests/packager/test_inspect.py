"""`byok-package inspect`: accepts good packages (ours and the vendor's), rejects bad ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from testsupport import VENDOR_SAMPLE, make_kid, write_kek

from offline_packager.cli import main
from offline_packager.keytypes import TYPE_NAMES
from offline_packager.package_format import b64url_encode, parse_package


def _inspect(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    rc = main(["inspect", *argv, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_vendor_sample_is_rsa4096_under_4096_kek(capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = _inspect(capsys, str(VENDOR_SAMPLE))
    assert rc == 0
    assert report["valid"]
    assert report["kek_size"] == 4096
    assert (report["rsa_block_bytes"], report["kwp_bytes"]) == (512, 2384)
    assert report["target_type"] == "rsa-4096"


def test_vendor_sample_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(VENDOR_SAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "VALID" in out
    assert "rsa-4096" in out


@pytest.fixture(scope="module")
def packages(keks: dict[int, rsa.RSAPrivateKey], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One package per type, spread over the KEK sizes."""
    tmp = tmp_path_factory.mktemp("pkgs")
    for i, name in enumerate(TYPE_NAMES):
        kek = keks[(2048, 3072, 4096)[i % 3]]
        pem, _ = write_kek(tmp, kek)
        rc = main(["wrap", "--kek", str(pem), "--kek-kid", make_kid(), "--generate", name,
                   "--out", str(tmp / f"{name}.byok")])  # fmt: skip
        assert rc == 0
    return tmp


@pytest.mark.parametrize("type_name", TYPE_NAMES)
@pytest.mark.parametrize("with_manifest", [True, False])
def test_every_packager_output_is_valid(
    packages: Path, type_name: str, with_manifest: bool, capsys: pytest.CaptureFixture[str],
    keks: dict[int, rsa.RSAPrivateKey],
) -> None:  # fmt: skip
    pkg = packages / type_name
    src = pkg.with_suffix(".byok")
    if not with_manifest:
        lone = packages / "lone"
        lone.mkdir(exist_ok=True)
        (lone / src.name).write_bytes(src.read_bytes())
        src = lone / src.name
    rc, report = _inspect(capsys, str(src))
    assert rc == 0, report
    if report["target_type"] is None:  # ambiguous lengths without a manifest need --kek
        assert not with_manifest
        assert report["notes"]
        size = (2048, 3072, 4096)[TYPE_NAMES.index(type_name) % 3]
        rc, report = _inspect(capsys, str(src), "--kek", str(packages / f"kek{size}.pem"))
    assert report["target_type"] == type_name
    assert report["target_type_inferred"] is not with_manifest


def _mutated(packages: Path, name: str, mutate: Any) -> Path:
    doc = json.loads((packages / f"{name}.byok").read_text())
    mutate(doc)
    path = packages / "bad" / f"{name}.byok"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def _truncate(doc: dict[str, Any]) -> None:
    # 40 bytes: an RSA-3072 target's AES-KWP block (1800 or 1808) falls below 1776, the least
    ct = parse_package(json.dumps(doc).encode()).ciphertext
    doc["ciphertext"] = b64url_encode(ct[:-40])


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (_truncate, "target_type_mismatch"),
        (lambda d: d["header"].update(alg="RSA-OAEP-256"), "wrong_alg"),
        (lambda d: d["header"].update(enc="CKM_AES_KEY_WRAP"), "wrong_enc"),
        (lambda d: d["header"].update(kid=d["header"]["kid"].rsplit("/", 1)[0]), "bad_kid"),
    ],
)
def test_bad_packages_are_rejected(
    packages: Path, mutate: Any, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _mutated(packages, "rsa-3072", mutate)
    # with the manifest (stated type, kid) and its KEK (rsa-3072 is wrapped under RSA-3072)
    rc, report = _inspect(capsys, str(path), "--manifest", str(packages / "rsa-3072.manifest.json"),
                          "--kek", str(packages / "kek3072.pem"))  # fmt: skip
    assert rc == 2
    assert reason in [f["reason"] for f in report["findings"]]


def test_ciphertext_for_another_kek_size_is_rejected(
    packages: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # ec-p521 was wrapped under the 4096-bit KEK (index 5 % 3 == 2); inspect it against 2048
    assert TYPE_NAMES.index("ec-p521") % 3 == 2
    rc, report = _inspect(
        capsys, str(packages / "ec-p521.byok"), "--kek", str(packages / "kek2048.pem")
    )
    assert rc == 2
    reasons = {f["reason"] for f in report["findings"]}
    assert reasons & {"target_type_mismatch", "kek_mismatch", "ciphertext_length_mismatch"}
    assert "kek_mismatch" in reasons  # the manifest's KEK fingerprint differs


def test_rsa_block_above_modulus_is_rejected(
    packages: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def above(doc: dict[str, Any]) -> None:
        ct = parse_package(json.dumps(doc).encode()).ciphertext
        doc["ciphertext"] = b64url_encode(b"\xff" * 256 + ct[256:])

    path = _mutated(packages, "oct-256", above)  # oct-256 was wrapped under the 2048-bit KEK
    rc, report = _inspect(
        capsys, str(path), "--kek", str(packages / "kek2048.pem"), "--type", "oct-256"
    )
    assert rc == 2
    assert [f["reason"] for f in report["findings"]] == ["rsa_block_out_of_range"]


def test_garbage_is_rejected_with_every_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "x.byok"
    path.write_bytes(b"not json")
    rc, report = _inspect(capsys, str(path))
    assert rc == 2
    assert report["findings"][0]["reason"] == "malformed_package"
