"""A separate writer process (another Function instance): appends 10 events to the trail in a
chain of its own, signed by a fresh key.

Usage: python trail_writer.py CONNECTION_STRING CONTAINER OFFSET
"""

from __future__ import annotations

import sys

from azure.storage.blob import BlobServiceClient
from cryptography.hazmat.primitives.asymmetric import ec

from byok_pipeline.audit.signers import FileSigner
from byok_pipeline.audit.trail import AuditTrail


def main() -> None:
    connection, container, offset = sys.argv[1], sys.argv[2], int(sys.argv[3])
    service = BlobServiceClient.from_connection_string(connection)
    signer = FileSigner(ec.generate_private_key(ec.SECP256R1()))
    trail = AuditTrail(service, container, signer=signer, role="pipeline", writer="process")
    for i in range(offset, offset + 10):
        trail.append(
            {
                "event": "byok.received",
                "time": "2026-01-02T03:04:05.000000Z",
                "pipeline_version": "0.1.0",
                "correlation_id": f"c{i}",
            }
        )


if __name__ == "__main__":
    main()
