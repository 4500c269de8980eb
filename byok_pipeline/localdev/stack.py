"""``byok dev up/down``: the local stack (Azurite + the emulator) for hands-on use and the demo.

Local runner only: this is the one place outside tests where the pipeline uses the emulator.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from azure.storage.blob import BlobServiceClient

from byok_pipeline.adapters.blobstore import BlobStore
from byok_pipeline.core.errors import ConfigError
from byok_pipeline.core.settings import DEFAULTS, Settings
from byok_pipeline.localdev.azurite import Azurite, stop_process_group

STATE_FILE = "stack.json"
ENV_FILE = "env"


def up(directory: Path) -> dict[str, Any]:
    """Start Azurite and the emulator on free loopback ports, create the containers, and write
    ``DIR/env`` (``source`` it) with every setting the other commands read.

    Raises:
        ConfigError: a stack already runs from DIR, or a service failed to start.
    """
    from managed_hsm_emulator.testing import start_emulator

    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / STATE_FILE).exists():
        raise ConfigError(
            f"a local stack is already recorded in {directory}; run `byok dev down --dir {directory}`"
        )
    azurite = Azurite.start(directory / "azurite")
    try:
        emulator = start_emulator(directory / "hsm")
    except Exception:
        azurite.stop()
        raise
    env = {
        "BYOK_HSM_URL": emulator.url,
        "BYOK_HSM_CA_BUNDLE": str(emulator.ca),
        "BYOK_HSM_EMULATOR_DIR": str(emulator.data_dir),
        "BYOK_STORAGE": azurite.connection_string,
        "BYOK_AUDIT_LOG": str(directory / "audit.jsonl"),
        **{k: v for k, v in DEFAULTS.items() if k.endswith("_CONTAINER")},
    }
    env.update(audit_keys(emulator, directory))
    settings = Settings.from_env(env)
    with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        BlobStore(service, settings).ensure_containers()
    state = {"azurite_pid": azurite.process.pid, "emulator_pid": emulator.process.pid, "env": env}
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2))
    write_env_file(directory / ENV_FILE, env)
    return {"dir": str(directory), "env_file": str(directory / ENV_FILE), **state}


def audit_keys(emulator: Any, directory: Path) -> dict[str, str]:
    """The local stack's audit signers: the pipeline's EC P-256 key inside the emulator (as
    ``byok audit init`` makes it in Azure) and a person's key file for the CLI, and the trust
    file naming both (``byok audit verify --trust DIR/audit-trust.json``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from byok_pipeline.audit.signers import p256_public_key
    from byok_pipeline.cli.audit_init import DEFAULT_NAME, trust_entry

    key = emulator.key_client().create_ec_key(
        DEFAULT_NAME, curve="P-256", key_operations=["sign", "verify"], hardware_protected=True
    )
    jwk: Any = key.key  # JsonWebKey sets its fields dynamically
    pipeline_public = p256_public_key(jwk)
    person = ec.generate_private_key(ec.SECP256R1())
    person_file = directory / "audit-person.key.pem"
    # created readable by its owner only, never through a planted link
    fd = os.open(person_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            person.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    from byok_pipeline.audit.signers import FileSigner

    signer = FileSigner.from_pem(person_file)
    trust = {
        "signers": [
            trust_entry(str(key.id), pipeline_public, "pipeline", "pipeline (local emulator)"),
            trust_entry(signer.kid, signer.public_key(), "person", "local operator"),
        ]
    }
    trust_file = directory / "audit-trust.json"
    trust_file.write_text(json.dumps(trust, indent=2) + "\n")
    return {
        "BYOK_AUDIT_SIGNING_KID": str(key.id),
        "BYOK_AUDIT_PERSON_KEY": str(person_file),
        "BYOK_AUDIT_TRUST_FILE": str(trust_file),
    }


def write_env_file(path: Path, env: Mapping[str, str]) -> None:
    """Settings for ``source``, with this virtualenv's ``bin`` (byok, byok-package) on PATH."""
    lines = ["# written by `byok dev up`; use: source " + shlex.quote(str(path))]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    bin_dir = shlex.quote(str(Path(sys.executable).parent))
    lines.append(f'case ":$PATH:" in *:{bin_dir}:*) ;; *) export PATH={bin_dir}:"$PATH" ;; esac')
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)


def down(directory: Path) -> dict[str, Any]:
    """Stop what ``up`` started (SIGTERM, then SIGKILL) and forget it. Idempotent."""
    directory = directory.resolve()
    state_path = directory / STATE_FILE
    if not state_path.exists():
        return {"dir": str(directory), "stopped": []}
    state = json.loads(state_path.read_text())
    stopped = []
    if state.get("azurite_pid"):
        stop_process_group(int(state["azurite_pid"]))
        stopped.append("azurite")
    if state.get("emulator_pid"):
        pid = int(state["emulator_pid"])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            stopped.append("emulator")
        _wait_gone(pid)
    state_path.unlink()
    return {"dir": str(directory), "stopped": stopped}


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def emulator_deps(hsm: Any, service: BlobServiceClient, prefix: str, **overrides: Any) -> Any:
    """Pipeline deps against a running emulator (``managed_hsm_emulator.testing`` handle) and a
    blob service, with containers ``<prefix>-incoming`` etc. created, fast retries, a 15 s lease,
    no client-side import pacing (the emulator's limits are off unless started with them), the
    policy read for every package, and an in-memory audit sink: the wiring tests and benchmarks
    share.
    """
    from byok_pipeline.adapters.keyvault import HsmAdapter
    from byok_pipeline.audit.events import MemoryAuditSink
    from byok_pipeline.processing.processor import Deps

    fast = {
        "retry_total": 3,
        "retry_backoff": 0.05,
        "retry_backoff_max": 2.0,
        "lease_seconds": 15,
        "hsm_imports_per_second": 1000.0,
        "policy_cache_seconds": 0.0,
    }
    settings = Settings(
        hsm_url=hsm.url,
        incoming_container=f"{prefix}-incoming",
        status_container=f"{prefix}-status",
        archive_container=f"{prefix}-archive",
        quarantine_container=f"{prefix}-quarantine",
        audit_container=f"{prefix}-audit",
        audit_people_container=f"{prefix}-people",
        config_container=f"{prefix}-config",
        approvals_container=f"{prefix}-approvals",
        **{**fast, **overrides},
    )
    from byok_pipeline.processing.wiring import env_settings_kwargs

    client = hsm.key_client(
        retry_total=settings.retry_total,
        retry_backoff_factor=settings.retry_backoff,
        retry_backoff_max=settings.retry_backoff_max,
        **env_settings_kwargs(verify=str(hsm.ca)),
    )
    store = BlobStore(service, settings)
    store.ensure_containers()
    adapter = HsmAdapter(client, settings)
    return Deps(settings=settings, store=store, hsm=adapter, audit=MemoryAuditSink())


def emulator_credential(emulator_dir: str) -> Any:
    """The local emulator's token credential (the stack's ``BYOK_HSM_EMULATOR_DIR``)."""
    from managed_hsm_emulator import EmulatorCredential

    return EmulatorCredential(emulator_dir)
