"""Session fixtures shared by every test folder."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa


@pytest.fixture(scope="session")
def keks() -> dict[int, rsa.RSAPrivateKey]:
    """One RSA KEK private key per supported size (generation is slow: do it once)."""
    return {bits: rsa.generate_private_key(65537, bits) for bits in (2048, 3072, 4096)}
