"""State in DIR survives restarts; concurrent requests are safe; material is sealed at rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from azure.keyvault.keys import JsonWebKey
from azure.keyvault.keys.crypto import EncryptionAlgorithm
from emulator_support import all_files, kcv_block, scan_for

from managed_hsm_emulator.testing import EmulatorStartError, running_emulator


def test_restart_keeps_keys_versions_deleted_state_and_certificates(tmp_path: Path) -> None:
    data = tmp_path / "hsm"
    aes = os.urandom(32)
    with running_emulator(data) as hsm:
        client = hsm.key_client()
        v1 = client.import_key("kept", JsonWebKey(kty="oct-HSM", k=aes)).properties.version
        v2 = client.create_oct_key("kept", size=256).properties.version
        client.create_ec_key("gone", curve="P-256")
        client.begin_delete_key("gone", _polling_interval=0).wait()
        ca_before = hsm.ca.read_bytes()
        assert hsm.stop() == 0
        assert not (data / "endpoint.json").exists()  # removed on a clean SIGTERM stop
    with running_emulator(data) as hsm:
        assert hsm.ca.read_bytes() == ca_before
        client = hsm.key_client()
        versions = [p.version for p in client.list_properties_of_key_versions("kept")]
        assert versions == [v1, v2]
        assert client.get_key("kept").properties.version == v2
        assert "gone" in {d.name for d in client.list_deleted_keys()}
        old = client.get_key("kept", v1)
        result = hsm.crypto_client(old).encrypt(
            EncryptionAlgorithm.a256_cbc, bytes(16), iv=bytes(16)
        )
        assert result.ciphertext == kcv_block(aes)  # material unsealed after the restart
        # sealed at rest: the AES key appears in no file of the data directory
        assert scan_for(all_files(data), aes) == []


def test_concurrent_creates_are_all_kept(tmp_path: Path) -> None:
    data = tmp_path / "hsm"
    errors: list[BaseException] = []
    with running_emulator(data) as hsm:
        client = hsm.key_client()
        client.create_oct_key("shared", size=128)

        def work(i: int) -> None:
            try:
                c = hsm.key_client()
                for _ in range(5):
                    c.create_oct_key("shared", size=128)
                    c.create_oct_key(f"own-{i}", size=128)
            except BaseException as exc:  # noqa: BLE001  # collected and re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert len(list(client.list_properties_of_key_versions("shared"))) == 31
    with running_emulator(data) as hsm:
        client = hsm.key_client()
        assert len(list(client.list_properties_of_key_versions("shared"))) == 31
        for i in range(6):
            assert len(list(client.list_properties_of_key_versions(f"own-{i}"))) == 5


def _rewrite_with_mac(data: Path, path: Path, doc: dict[str, Any]) -> None:
    """Write a key file as the emulator would, MAC included (needs master.key)."""
    from managed_hsm_emulator.sealing import Sealer
    from managed_hsm_emulator.store import record_from_json, record_to_json
    from offline_packager.secret import SecretBytes

    sealer = Sealer(SecretBytes((data / "master.key").read_bytes()))
    doc.pop("mac", None)
    doc["format"] = 1  # read without a MAC check, then written with a fresh MAC
    record, _ = record_from_json(json.dumps(doc).encode(), sealer, file_name=path.name)
    path.write_bytes(record_to_json(record, sealer))


def test_edited_key_file_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "hsm"
    with running_emulator(data) as hsm:
        client = hsm.key_client()
        client.create_rsa_key("locked", size=2048, key_operations=["verify"])
        client.update_key_properties("locked", enabled=False)
    path = data / "keys" / "locked.json"
    original = path.read_text()
    doc = json.loads(original)
    # someone without master.key tries to make the key usable for more than it allows
    doc["versions"][0]["key_ops"] = ["sign", "verify", "decrypt"]
    doc["versions"][0]["attributes"]["enabled"] = True
    path.write_text(json.dumps(doc))
    with pytest.raises(EmulatorStartError) as exc, running_emulator(data):
        pass
    assert "key_file_tampered" in str(exc.value)
    assert "locked.json" in str(exc.value)
    assert "integrity" in str(exc.value)
    path.write_text(original)  # restored from the "backup": starts again, unchanged
    with running_emulator(data) as hsm:
        key = hsm.key_client().get_key("locked")
        assert key.key_operations == ["verify"]
        assert key.properties.enabled is False


def test_damaged_sealed_material_is_detected(tmp_path: Path) -> None:
    data = tmp_path / "hsm"
    with running_emulator(data) as hsm:
        key = hsm.key_client().create_oct_key("damaged", size=128)
    path = data / "keys" / "damaged.json"
    doc = json.loads(path.read_text())
    sealed = bytearray(doc["versions"][0]["sealed"].encode())
    sealed[20] = ord("A") if sealed[20] != ord("A") else ord("B")
    doc["versions"][0]["sealed"] = sealed.decode()
    path.write_text(json.dumps(doc))
    # without a matching MAC the file is refused at start...
    with pytest.raises(EmulatorStartError, match="key_file_tampered"), running_emulator(data):
        pass
    # ...and even with one (written by someone holding master.key), the AEAD of the sealed
    # material still refuses the damaged blob when the key is used
    _rewrite_with_mac(data, path, doc)
    with running_emulator(data) as hsm:
        resp = hsm.request(
            "POST",
            f"/keys/damaged/{key.properties.version}/encrypt?api-version=7.6",
            {"alg": "A128CBC", "value": "A" * 22, "iv": "A" * 22},
        )
        assert resp.status == 500
        assert resp.body["error"]["innererror"]["code"] == "sealed_material_damaged"


def test_secret_files_are_private(tmp_path: Path) -> None:
    with running_emulator(tmp_path / "hsm") as hsm:
        hsm.key_client().create_oct_key("x", size=128)
        for name in ("master.key", "token.key", "ca.key", "server.key", "keys/x.json"):
            assert (hsm.data_dir / name).stat().st_mode & 0o077 == 0, name


def test_one_emulator_per_data_dir_and_bad_options(tmp_path: Path) -> None:
    data = tmp_path / "hsm"
    with running_emulator(data):
        second = subprocess.run(
            [sys.executable, "-m", "managed_hsm_emulator", "--data-dir", str(data)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert second.returncode == 2
        assert "data_dir_in_use" in second.stderr
    (data / "master.key").chmod(0o644)
    bad = subprocess.run(
        [sys.executable, "-m", "managed_hsm_emulator", "--data-dir", str(data)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "secret_file" in bad.stderr


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_clean_stop_on_signals(tmp_path: Path, signal_name: str) -> None:
    import signal

    with running_emulator(tmp_path / "hsm") as hsm:
        hsm.process.send_signal(getattr(signal, signal_name))
        assert hsm.process.wait(10) == 0
        assert not (hsm.data_dir / "endpoint.json").exists()
        assert "stopped" in hsm.log_text()
