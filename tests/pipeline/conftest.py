"""Pipeline fixtures: Azurite and the emulator (started by the tests on free loopback ports),
an import-only KEK, and a per-test set of containers so tests never see each other's blobs."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient
from pipeline_support import Stack

from byok_pipeline.localdev.azurite import Azurite
from managed_hsm_emulator.testing import EmulatorHandle

_COUNTER = itertools.count()


@pytest.fixture(scope="session")
def kek_name(hsm: EmulatorHandle) -> str:
    hsm.key_client().create_rsa_key(
        "pipeline-kek", size=3072, key_operations=["import"], hardware_protected=True
    )
    return "pipeline-kek"


@pytest.fixture
def stack(azurite: Azurite, hsm: EmulatorHandle, kek_name: str, tmp_path: Path) -> Iterator[Stack]:
    prefix = f"t{next(_COUNTER)}"
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    s = Stack.create(azurite, hsm, kek_name, prefix, tmp_path, service)
    yield s
    s.close()


@pytest.fixture(scope="module")
def stack_module(
    azurite: Azurite, hsm: EmulatorHandle, kek_name: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One stack for a whole module (property-based tests make many examples)."""
    prefix = f"m{next(_COUNTER)}"
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    s = Stack.create(azurite, hsm, kek_name, prefix, tmp_path_factory.mktemp(prefix), service)
    yield s
    s.close()
