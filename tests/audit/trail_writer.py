"""A separate writer process: appends COUNT events to the trail, as another Function instance.

Usage: python trail_writer.py CONTAINER WRITER_ID COUNT   (BYOK_STORAGE in the environment)
"""

from __future__ import annotations

import os
import sys

from audit_support import sample_event
from azure.storage.blob import BlobServiceClient

from byok_pipeline.audit.trail import AuditTrail


def main() -> None:
    container, writer, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    service = BlobServiceClient.from_connection_string(os.environ["BYOK_STORAGE"])
    trail = AuditTrail(service, container)
    for i in range(count):
        trail.append(sample_event(i, key=f"writer-{writer}"))


if __name__ == "__main__":
    main()
