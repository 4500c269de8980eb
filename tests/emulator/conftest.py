"""Emulator fixtures: one emulator per test module, targets generated once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from azure.keyvault.keys import KeyClient
from emulator_support import make_targets

from managed_hsm_emulator.testing import EmulatorHandle, running_emulator
from offline_packager.target_keys import TargetKey


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorHandle]:
    """A running emulator shared by the tests of one module (stopped afterwards)."""
    with running_emulator(tmp_path_factory.mktemp("hsm")) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(hsm: EmulatorHandle) -> KeyClient:
    """An SDK KeyClient for the module's emulator, with fast retries."""
    return hsm.key_client(retry_backoff_factor=0.05)


@pytest.fixture(scope="session")
def targets() -> dict[str, TargetKey]:
    """One target key of each of the ten supported types."""
    return make_targets()
