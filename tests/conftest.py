"""Session fixtures shared by every test folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from byok_pipeline.localdev.azurite import Azurite
from managed_hsm_emulator.testing import EmulatorHandle, running_emulator


@pytest.fixture(scope="session")
def keks() -> dict[int, rsa.RSAPrivateKey]:
    """One RSA KEK private key per supported size (generation is slow: do it once)."""
    return {bits: rsa.generate_private_key(65537, bits) for bits in (2048, 3072, 4096)}


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """Azurite on a free 127.0.0.1 port for the whole session, stopped at the end."""
    with Azurite.start(tmp_path_factory.mktemp("azurite")) as az:
        yield az


@pytest.fixture(scope="session")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorHandle]:
    """The Managed HSM emulator on a free 127.0.0.1 port for the whole session, stopped at the end."""
    with running_emulator(tmp_path_factory.mktemp("hsm") / "data") as handle:
        yield handle
