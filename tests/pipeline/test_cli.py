"""The `byok` CLI against Azurite and the emulator: KEKs, upload, import, status, watch, dev."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pipeline_support import Stack

from byok_pipeline.cli.main import main
from managed_hsm_emulator.testing import EmulatorHandle
from offline_packager.cli import main as package_main

pytestmark = pytest.mark.azurite


@pytest.fixture(scope="session")
def audit_keys(hsm: EmulatorHandle, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The audit signers the CLI needs: the pipeline's key in the emulator (`byok watch`) and
    a person's key file (`byok kek`, `byok policy set`, `byok import`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = hsm.key_client().create_ec_key(
        "cli-audit-signer", curve="P-256", key_operations=["sign", "verify"],
        hardware_protected=True,
    )  # fmt: skip
    person = tmp_path_factory.mktemp("person") / "person.key.pem"
    person.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {"BYOK_AUDIT_SIGNING_KID": str(key.id), "BYOK_AUDIT_PERSON_KEY": str(person)}


@pytest.fixture
def cli_env(stack: Stack, monkeypatch: pytest.MonkeyPatch, audit_keys: dict[str, str]) -> Stack:
    for key, value in {
        **audit_keys,
        **stack.env(),
        "BYOK_AUDIT_LOG": str(stack.tmp / "audit.jsonl"),
        "BYOK_RETRY_BACKOFF_SECONDS": "0.05",
    }.items():
        monkeypatch.setenv(key, value)
    return stack


def run_json(capsys: pytest.CaptureFixture[str], *argv: str, expect: int = 0) -> Any:
    rc = main([*argv, "--json"])
    out = capsys.readouterr()
    assert rc == expect, out.err
    return json.loads(out.out)


def test_ceremony_through_the_cli(
    cli_env: Stack, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    stack = cli_env
    created = run_json(
        capsys, "kek", "create", "--name", "cli-kek", "--size", "2048", "--expires-days", "3"
    )
    assert created["key_ops"] == ["import"]
    # a second create of the same name is refused unless a new version is asked for
    assert main(["kek", "create", "--name", "cli-kek", "--size", "2048"]) == 2
    assert "[kek_exists]" in capsys.readouterr().err
    assert main(["kek", "create", "--name", "x", "--expires-days", "0"]) == 2  # usage
    capsys.readouterr()
    kek_pem = tmp_path / "kek.pem"
    info = run_json(capsys, "kek", "download", "--kid", created["kid"], "--out", str(kek_pem))
    assert info["kid"] == created["kid"]
    assert kek_pem.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    # refuses to overwrite the PEM
    assert main(["kek", "download", "--kid", created["kid"], "--out", str(kek_pem)]) == 2

    out = tmp_path / "cli-rsa.byok"
    assert package_main(["wrap", "--kek", str(kek_pem), "--kek-kid", created["kid"], "--kek-sha256",
                         info["spki_sha256"], "--generate", "rsa-2048", "--out", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    uploaded = run_json(
        capsys, "upload", str(out), "--tag", "owner=payments", "--tag", "ticket=CHG-1"
    )
    assert uploaded["metadata"]["byok_target_type"] == "rsa-2048"
    # a second upload of the same name while it waits is refused
    run_json(capsys, "upload", str(out), expect=2)

    waiting = run_json(capsys, "status", "cli-rsa")  # by key name, before delivery
    assert waiting == {"blob_name": "cli-rsa.byok", "state": "waiting"}
    assert main(["watch", "--once"]) == 0
    capsys.readouterr()
    status = run_json(capsys, "status", "cli-rsa.byok")
    assert (status["state"], status["fingerprint_result"]) == ("imported", "match")
    assert run_json(capsys, "status", "--state", "imported")[0]["blob_name"] == "cli-rsa.byok"
    tags = stack.hsm.key_client().get_key("cli-rsa").properties.tags
    assert tags is not None
    assert (tags["owner"], tags["ticket"], tags["byok-kek-kid"]) == (
        "payments",
        "CHG-1",
        created["kid"],
    )
    assert tags["byok-package-sha256"] == status["package_sha256"]

    audit = [json.loads(line) for line in (stack.tmp / "audit.jsonl").read_text().splitlines()]
    names = [e["event"] for e in audit]
    assert names[:2] == ["byok.kek.created", "byok.kek.downloaded"]
    assert audit[1]["key_name"] == "cli-kek"
    assert run_json(capsys, "status", "nothing-here", expect=2)["reason"] == "not_found"
    assert "byok.imported" in names


def test_import_directly_is_idempotent_and_verified(
    cli_env: Stack, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    stack = cli_env
    kek_pem = tmp_path / "kek.pem"
    kek_pem.write_bytes(stack.kek_pem)
    out = tmp_path / "direct-ec.byok"
    assert package_main(["wrap", "--kek", str(kek_pem), "--kek-kid", stack.kek_kid, "--generate", "ec-p521",
                         "--out", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    first = run_json(capsys, "import", str(out))
    assert (first["fingerprint_result"], first["already_imported"]) == ("match", False)
    again = run_json(capsys, "import", str(out))
    assert (again["imported_kid"], again["already_imported"]) == (first["imported_kid"], True)
    versions = list(stack.hsm.key_client().list_properties_of_key_versions("direct-ec"))
    assert len(versions) == 1


def test_import_refusals_have_exit_2_and_reason(
    cli_env: Stack, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.byok"
    bad.write_bytes(b"{}")
    assert main(["import", str(bad)]) == 2
    assert "[malformed_package]" in capsys.readouterr().err
    wrong = tmp_path / "vendor.byok"
    from testsupport import VENDOR_SAMPLE

    wrong.write_bytes(VENDOR_SAMPLE.read_bytes())
    result = run_json(capsys, "import", str(wrong), expect=2)
    assert result["reason"] == "kid_wrong_hsm"


def test_import_without_storage_cannot_skip_a_required_policy(
    cli_env: Stack,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """BYOK_POLICY_REQUIRED without storage: the policy cannot be read, so `byok import` imports
    nothing (review finding: it went on without any policy)."""
    stack = cli_env
    kek_pem = tmp_path / "kek.pem"
    kek_pem.write_bytes(stack.kek_pem)
    out = tmp_path / f"nopolicy-{secrets.token_hex(3)}.byok"
    assert package_main(["wrap", "--kek", str(kek_pem), "--kek-kid", stack.kek_kid, "--generate", "oct-256",
                         "--out", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    monkeypatch.setenv("BYOK_POLICY_REQUIRED", "true")
    monkeypatch.delenv("BYOK_STORAGE", raising=False)
    refused = run_json(capsys, "import", str(out), expect=1)
    assert refused["reason"] == "config_error"
    assert "BYOK_POLICY_REQUIRED" in refused["message"]
    names = {k.name for k in stack.hsm.key_client().list_properties_of_keys()}
    assert out.name.removesuffix(".byok") not in names


def test_missing_settings_fail_clearly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("BYOK_HSM_URL", raising=False)
    monkeypatch.delenv("BYOK_STORAGE", raising=False)
    assert main(["watch", "--once"]) == 1  # needs the HSM
    assert "[config_error]: BYOK_HSM_URL" in capsys.readouterr().err
    assert main(["status"]) == 1  # needs only storage
    assert "[config_error]: set BYOK_STORAGE" in capsys.readouterr().err


def test_reasons_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    codes = run_json(capsys, "reasons")
    assert "kek_not_import_only" in codes
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "Exit codes" in " ".join(capsys.readouterr().out.split())


def test_dev_up_writes_a_sourceable_env_and_down_stops_everything(tmp_path: Path) -> None:
    byok = str(Path(sys.executable).with_name("byok"))
    stack_dir = tmp_path / "dev"
    up = subprocess.run([byok, "dev", "up", "--dir", str(stack_dir), "--json"], capture_output=True, text=True,
                        timeout=120, check=True)  # fmt: skip
    state = json.loads(up.stdout)
    try:
        script = (
            f"source {shlex.quote(str(stack_dir / 'env'))} && {shlex.quote(byok)} status --json"
        )
        status = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, timeout=120, check=False
        )
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout) == []
    finally:
        down = subprocess.run([byok, "dev", "down", "--dir", str(stack_dir), "--json"], capture_output=True,
                              text=True, timeout=60, check=True)  # fmt: skip
    assert sorted(json.loads(down.stdout)["stopped"]) == ["azurite", "emulator"]
    for pid in (state["azurite_pid"], state["emulator_pid"]):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


SECRET_KEY = "c2VjcmV0LWFjY291bnQta2V5LXRoYXQtbXVzdC1uZXZlci1iZS1lY2hvZWQ="


@pytest.mark.parametrize(
    "value",
    [
        f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={SECRET_KEY};",
        f"BlobEndpoint=https://acct.blob.core.windows.net;SharedAccessSignature=sv=1&sig={SECRET_KEY}",
        f"https://acct.blob.core.windows.net/?sv=2024-01-01&sig={SECRET_KEY}",
        "http://acct.blob.core.windows.net",
        "acct",
    ],
)
def test_storage_option_never_takes_a_secret(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--storage` refuses keys, SAS tokens and anything but an https account URL or @FILE, in
    one usage line that does not repeat the value."""
    assert main(["status", "--storage", value]) == 2
    err = capsys.readouterr().err
    assert "--storage" in err
    assert "@FILE" in err
    assert SECRET_KEY not in err
    assert "Traceback" not in err


def test_storage_option_reads_a_connection_string_from_a_file(
    cli_env: Stack,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = cli_env
    conn = tmp_path / "storage.conn"
    conn.write_text(stack.azurite.connection_string + "\n")
    monkeypatch.delenv("BYOK_STORAGE")
    # without any storage setting the command cannot run
    assert main(["status", "--json"]) == 1
    capsys.readouterr()
    listed = run_json(capsys, "status", "--storage", f"@{conn}")
    assert isinstance(listed, dict | list)
    # an unreadable file is one usage line
    assert main(["status", "--storage", f"@{tmp_path / 'missing.conn'}"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_storage_account_url_selects_identity_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    from byok_pipeline.cli.storage_arg import storage_arg

    env = {"BYOK_STORAGE": "UseDevelopmentStorage=true"}
    storage_arg("https://acct.blob.core.windows.net/").apply(env)
    assert env == {"BYOK_STORAGE__blobServiceUri": "https://acct.blob.core.windows.net"}


def _approver_policy(
    tmp_path: Path, name: str, *, required: int = 2
) -> tuple[Path, dict[str, Any]]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    keys = {who: ec.generate_private_key(ec.SECP256R1()) for who in ("alice", "bob", "carol")}
    for who, key in keys.items():
        (tmp_path / f"{who}.key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    pems = {
        who: key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
        for who, key in keys.items()
    }
    doc = {
        "policy_version": 1,
        "approver_groups": {
            "custodians": {"approvers": [{"id": w, "public_key_pem": p} for w, p in pems.items()]}
        },
        "rules": [
            {"name": name, "approvals": {"group": "custodians", "required": required}},
            {"prefix": "open-"},
        ],
    }
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(doc, indent=2))
    return path, doc


def test_policy_validate_names_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, doc = _approver_policy(tmp_path, "pay")
    assert main(["policy", "validate", str(good)]) == 0
    assert "valid (sha256 " in capsys.readouterr().out
    doc["rules"][0]["approvals"]["required"] = 4
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    assert main(["policy", "validate", str(bad), "--json"]) == 2
    out = capsys.readouterr()
    assert "[policy_invalid]" in out.err
    assert "rules[0].approvals.required" in out.err
    assert json.loads(out.out)["reason"] == "policy_invalid"
    assert main(["policy", "validate", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_policy_set_show_and_audit(
    cli_env: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = cli_env
    shown = run_json(capsys, "policy", "show")
    assert shown == {"policy": None}
    path, _ = _approver_policy(tmp_path, "pay")
    set_ = run_json(capsys, "policy", "set", str(path), "--actor", "admin@example")
    assert set_["old_policy_sha256"] is None
    shown = run_json(capsys, "policy", "show")
    assert shown["sha256"] == set_["policy_sha256"]
    assert shown["rules"][0]["approvals"] == "2 of group 'custodians'"
    # an invalid file is refused before anything is written
    bad = tmp_path / "bad.json"
    bad.write_text('{"policy_version": 1}')
    assert main(["policy", "set", str(bad)]) == 2
    assert "[policy_invalid]" in capsys.readouterr().err
    assert run_json(capsys, "policy", "show")["sha256"] == set_["policy_sha256"]
    events = [
        json.loads(line)
        for line in (stack.tmp / "audit.jsonl").read_text().splitlines()
        if '"byok.policy.changed"' in line
    ]
    assert len(events) == 1
    assert events[0]["policy_sha256"] == set_["policy_sha256"]
    assert events[0]["old_policy_sha256"] is None
    assert events[0]["actor"] == "admin@example"
    import jsonschema
    from testsupport import REPO

    schema = json.loads((REPO / "byok_pipeline/schemas/audit-event.schema.json").read_text())
    jsonschema.validate(events[0], schema)


def test_dual_control_through_the_cli(
    cli_env: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ceremony of the README: policy set, approve offline, upload with the first approval,
    wait, upload the second approval, imported; a direct import of that name is refused."""
    import secrets

    stack = cli_env
    name = f"cli-pay-{secrets.token_hex(3)}"
    policy, _ = _approver_policy(tmp_path, name)
    run_json(capsys, "policy", "set", str(policy))
    kek_pem = tmp_path / "kek.pem"
    kek_pem.write_bytes(stack.kek_pem)
    out = tmp_path / f"{name}.byok"
    manifest = tmp_path / f"{name}.manifest.json"
    assert package_main(["wrap", "--kek", str(kek_pem), "--kek-kid", stack.kek_kid,
                         "--generate", "ec-p256", "--out", str(out)]) == 0  # fmt: skip

    def approve(who: str) -> Path:
        path = tmp_path / f"{name}.approval-{who}.json"
        assert package_main(["approve", str(manifest), "--approver-id", who, "--signer-key",
                             str(tmp_path / f"{who}.key.pem"), "--out", str(path)]) == 0  # fmt: skip
        return path

    approve("alice")
    capsys.readouterr()
    uploaded = run_json(capsys, "upload", str(out))
    assert [a["approver_id"] for a in uploaded["attachments"]["approvals"]] == ["alice"]
    assert main(["watch", "--once"]) == 0  # waiting for people is settled, not a failure
    capsys.readouterr()
    waiting = run_json(capsys, "status", name)
    assert waiting["state"] == "awaiting_approval"
    assert waiting["approvals"]["missing"] == 1
    assert main(["status", name]) == 0
    text = capsys.readouterr().out
    assert "approvals: 1 of 2 required from group 'custodians', 1 missing" in text
    assert "waiting for: bob, carol" in text

    # a direct import cannot bypass the approvals
    assert run_json(capsys, "import", str(out), expect=2)["reason"] == "approval_invalid"

    second = approve("carol")
    capsys.readouterr()
    stored = run_json(capsys, "approve", "upload", str(second))
    assert stored["approvals"][0]["approver_id"] == "carol"
    # the same file again is accepted as already stored; garbage is refused with one line
    assert run_json(capsys, "approve", "upload", str(second))["approvals"][0]["already_stored"]
    junk = tmp_path / "junk.approval-x.json"
    junk.write_text("{}")
    assert run_json(capsys, "approve", "upload", str(junk), expect=2)["reason"] == (
        "approval_invalid"
    )
    assert main(["watch", "--once"]) == 0
    capsys.readouterr()
    done = run_json(capsys, "status", name)
    assert (done["state"], done["fingerprint_result"]) == ("imported", "match")
    assert sorted(g["approver_id"] for g in done["approvals"]["given"]) == ["alice", "carol"]


def test_audit_init_creates_a_sign_only_key_and_its_trust_entry(
    cli_env: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    import secrets

    stack = cli_env
    name = f"audit-signer-{secrets.token_hex(3)}"
    created = run_json(capsys, "audit", "init", "--name", name)
    key = stack.hsm.key_client().get_key(name)
    assert created["kid"] == str(key.id)
    assert sorted(str(getattr(o, "value", o)) for o in key.key_operations or []) == [
        "sign", "verify",
    ]  # fmt: skip
    entry = created["trust_entry"]
    assert (entry["kid"], entry["role"]) == (str(key.id), "pipeline")
    assert entry["public_key_pem"].startswith("-----BEGIN PUBLIC KEY-----")
    assert run_json(capsys, "audit", "init", "--name", name, expect=2)["reason"] == (
        "audit_key_exists"
    )
    rotated = run_json(capsys, "audit", "init", "--name", name, "--new-version")
    assert rotated["kid"] != created["kid"]


@pytest.mark.parametrize(
    "spoil",
    [
        lambda d: d["header"].update(kid=d["header"]["kid"].replace("https://", "https://[")),
        lambda d: d["header"].update(kid=d["header"]["kid"].replace("/keys/", "/keys/p\t")),
        lambda d: d.update(extra=None),  # replaced by a 5,000-digit number in the text
    ],
    ids=["kid-bracket", "kid-tab", "huge-int"],
)
def test_byok_import_refuses_hostile_packages_with_exit_2(  # issue 15, cases 1 and 3
    cli_env: Stack, capsys: pytest.CaptureFixture[str], tmp_path: Path, spoil: Any
) -> None:
    pkg = cli_env.package("oct-256", "cli-hostile")
    doc = json.loads(pkg.data)
    spoil(doc)
    path = tmp_path / "cli-hostile.byok"
    text = (
        json.dumps(doc)
        if "extra" not in doc
        else pkg.data.decode()[:-1] + ',"x":' + "9" * 5000 + "}"
    )
    path.write_text(text)
    assert main(["import", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "[bad_kid]" in err or "[malformed_package]" in err


def test_status_table_lists_waiting_packages_sorted_with_counts_and_detail_says_what_to_do(
    cli_env: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = cli_env
    done = stack.package("ec-p256", "view-done")
    stack.drop_package(done)
    assert stack.deliver(done.name).state == "imported"
    refused = stack.package("oct-256", "view-refused")
    stack.drop(refused.name, refused.data, {"byok_target_type": "rsa-1024"})
    assert stack.deliver(refused.name).reason_code == "bad_metadata"
    later = stack.package("oct-128", "view-waiting")
    stack.drop_package(later)  # not delivered yet
    monkeypatch.setenv("BYOK_MAX_ATTEMPTS", "5")
    capsys.readouterr()
    assert main(["status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line) <= 100 for line in lines), max(lines, key=len)
    assert lines[0].split() == ["NAME", "STATE", "REASON", "TRIES", "AGE"]
    body = [line.split() for line in lines[1:-1]]
    assert [(row[0], row[1]) for row in body] == [
        ("view-done.byok", "imported"), ("view-refused.byok", "rejected"),
        ("view-waiting.byok", "waiting"),
    ]  # fmt: skip  # oldest first
    assert body[1][2:4] == ["bad_metadata", "1/5"]
    assert lines[-1] == "3 packages: 1 imported, 1 rejected, 1 waiting"
    assert "\033[" not in "\n".join(lines)  # no colour when not on a terminal

    waiting = run_json(capsys, "status", "--state", "waiting")
    assert [w["blob_name"] for w in waiting] == ["view-waiting.byok"]
    capsys.readouterr()
    assert main(["status", "--state", "bogus"]) == 2  # a usage error: one line, exit 2
    assert "bogus" in capsys.readouterr().err

    assert main(["status", "view-refused"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("view-refused.byok: rejected [bad_metadata]")
    assert "attempts:      1/5" in text
    assert "received" in text
    assert "what to do: The upload metadata" in text


def test_watch_exits_1_when_a_package_ends_failed_and_says_when_it_retries(
    cli_env: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = cli_env
    monkeypatch.setenv("BYOK_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("BYOK_RETRY_TOTAL", "0")
    pkg = stack.package("ec-p256", "watch-fails")
    stack.drop_package(pkg)
    stack.hsm.inject_fault("503", method="PUT", path="/keys/watch-fails", count=100)
    try:
        capsys.readouterr()
        assert main(["watch", "--once", "--interval", "0.1"]) == 1
    finally:
        stack.hsm.clear_faults()
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d watch-fails\.byok: will retry \(attempt 1/2, next try at "
        r"\d\d:\d\d:\d\d\): .*503.*", lines[0]
    ), lines[0]  # fmt: skip
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d watch-fails\.byok: failed \[attempts_exhausted\]", lines[-1]
    )
    assert "delivered 1 package: 1 failed; 1 redelivery" in captured.err
