"""SoftHSM2 fixtures: one fresh token per test session, in a temporary token directory.

SoftHSM reads ``SOFTHSM2_CONF`` when the module is initialised, so the session fixture sets
it before anything loads the module (and re-initialises the module if something already did).
A missing SoftHSM2 or python-pkcs11 is a failure, not a skip: ``make test`` installs both.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from softhsm_helpers import (
    PIN_ENV,
    SO_PIN,
    SOFTHSM_MODULE,
    TOKEN_LABEL,
    USER_PIN,
    KekFiles,
    SoftHsm,
)

_labels = itertools.count(1)


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    if not Path(SOFTHSM_MODULE).is_file() or shutil.which("softhsm2-util") is None:
        pytest.fail(f"SoftHSM2 is not installed ({SOFTHSM_MODULE}); apt-get install softhsm2")
    try:
        import pkcs11
    except ImportError:
        pytest.fail("python-pkcs11 is not installed (requirements-dev.txt)")
    base = tmp_path_factory.mktemp("softhsm")
    tokens = base / "tokens"
    tokens.mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(conf))
        subprocess.run(
            [
                "softhsm2-util",
                "--init-token",
                "--free",
                "--label",
                TOKEN_LABEL,
                "--so-pin",
                SO_PIN,
                "--pin",
                USER_PIN,
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        )
        # If another test already initialised the module with another config, re-read ours.
        pkcs11.lib(SOFTHSM_MODULE).reinitialize()
        yield SoftHsm(SOFTHSM_MODULE, TOKEN_LABEL, USER_PIN, conf)


@pytest.fixture
def pin_env(softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of an environment variable holding the user PIN (for ``--pin-env``)."""
    monkeypatch.setenv(PIN_ENV, softhsm.pin)
    return PIN_ENV


@pytest.fixture
def label(request: pytest.FixtureRequest) -> str:
    """A key label unique in the session's token."""
    return f"t{next(_labels)}-{request.node.name[:40]}"


@pytest.fixture(scope="session")
def kek(tmp_path_factory: pytest.TempPathFactory) -> KekFiles:
    private_key = rsa.generate_private_key(65537, 2048)
    pem = tmp_path_factory.mktemp("kek") / "kek.pem"
    pem.write_bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return KekFiles(private_key, pem)
