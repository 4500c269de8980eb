"""A worker process that dies (os._exit, no cleanup) at a named stage, like a killed host.

Usage: python crash_worker.py STAGE BLOB_NAME   (settings as JSON on stdin)
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from azure.storage.blob import BlobServiceClient

from byok_pipeline.adapters.blobstore import BlobStore
from byok_pipeline.adapters.keyvault import HsmAdapter
from byok_pipeline.audit.events import JsonLinesAuditSink
from byok_pipeline.core.settings import Settings
from byok_pipeline.processing.processor import Deps, process_blob
from managed_hsm_emulator import EmulatorCredential


def main() -> None:
    stage, blob_name = sys.argv[1], sys.argv[2]
    cfg: dict[str, Any] = json.loads(sys.stdin.read())
    raw = cfg["settings"]
    for key in ("allowed_kek_names", "allowed_target_types"):
        raw[key] = frozenset(raw[key])
    settings = Settings(**raw)
    from azure.keyvault.keys import KeyClient

    client = KeyClient(settings.hsm_url, EmulatorCredential(cfg["hsm_dir"]),
                       verify_challenge_resource=False, connection_verify=cfg["ca"])  # fmt: skip
    service = BlobServiceClient.from_connection_string(cfg["storage"])

    def crash(at: str) -> None:
        if at == stage:
            os._exit(137)

    deps = Deps(settings=settings, store=BlobStore(service, settings),
                hsm=HsmAdapter(client, settings), audit=JsonLinesAuditSink(cfg["audit"]), fault=crash)  # fmt: skip
    process_blob(blob_name, deps)


if __name__ == "__main__":
    main()
