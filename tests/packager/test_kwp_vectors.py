"""RFC 5649 section 6 vectors through the KWP code path the packager uses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from offline_packager.errors import WrapError
from offline_packager.secret import SecretBytes
from offline_packager.wrap import kwp_unwrap, kwp_wrap

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent.parent / "vectors" / "rfc5649.json").read_text()
)["vectors"]


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{len(v['key']) // 2}-byte key")
def test_rfc5649_wrap_and_unwrap(vector: dict[str, Any]) -> None:
    kek = SecretBytes(bytes.fromhex(vector["kek"]))
    key = SecretBytes(bytes.fromhex(vector["key"]))
    assert kwp_wrap(kek, key).hex() == vector["wrapped"]
    assert kwp_unwrap(kek, bytes.fromhex(vector["wrapped"])) == key


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{len(v['key']) // 2}-byte key")
def test_rfc5649_tampered_fails_integrity(vector: dict[str, Any]) -> None:
    wrapped = bytearray.fromhex(vector["wrapped"])
    wrapped[-1] ^= 1
    with pytest.raises(WrapError) as err:
        kwp_unwrap(SecretBytes(bytes.fromhex(vector["kek"])), bytes(wrapped))
    assert err.value.reason == "kwp_integrity"
