"""HSM-mode refusals, table-driven through the CLI: exit code 2, a one-line reason on stderr,
no output file, no PIN echoed."""

from __future__ import annotations

import _ctypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from softhsm_helpers import (
    PIN_ENV,
    KekFiles,
    SoftHsm,
    import_aes,
    import_ec,
    import_public,
    import_rsa,
    wrap_args,
)

from offline_packager.cli import main
from offline_packager.cli_exit import EXIT_REFUSED
from offline_packager.pkcs11_source import EC_PARAMS_BY_CRV

pytestmark = pytest.mark.softhsm

Setup = Callable[[Any, str], None]
# A shared library that exists everywhere the tests run and exports no C_GetFunctionList.
NOT_A_PKCS11_MODULE = str(Path(_ctypes.__file__ or "").resolve())
P256 = EC_PARAMS_BY_CRV["P-256"]


def _nothing(session: Any, label: str) -> None:
    del session, label


def _aes(session: Any, label: str) -> None:
    import_aes(session, bytes(range(16)), label)


def _two_aes(session: Any, label: str) -> None:
    import_aes(session, bytes(range(16)), label)
    import_aes(session, bytes(range(1, 17)), label)


def _unextractable_aes(session: Any, label: str) -> None:
    from pkcs11 import Attribute

    import_aes(session, bytes(range(32)), label, {Attribute.EXTRACTABLE: False})


def _label(lbl: str) -> list[str]:
    return ["--key-label", lbl]


def _rsa_1024(session: Any, label: str) -> None:
    from pkcs11 import Attribute, KeyType

    session.generate_keypair(
        KeyType.RSA,
        1024,
        label=label,
        store=True,
        private_template={Attribute.EXTRACTABLE: True},
    )


def _ec_p224(session: Any, label: str) -> None:
    from pkcs11 import Attribute, KeyType

    session.generate_keypair(
        KeyType.EC,
        label=label,
        store=True,
        public_template={Attribute.EC_PARAMS: bytes.fromhex("06052b81040021")},  # secp224r1
        private_template={Attribute.EXTRACTABLE: True},
    )


def _ec_without_public(session: Any, label: str) -> None:
    import_ec(session, ec.generate_private_key(ec.SECP256R1()), P256, label, with_public=False)


def _ec_with_orphan_public(session: Any, label: str) -> None:
    """The EC private key's own public object is missing; another key's shares the label."""
    _ec_without_public(session, label)
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    import_public(session, other, label, b"another key", P256)


def _ec_public_on_another_curve(session: Any, label: str) -> None:
    _ec_without_public(session, label)
    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    import_public(session, other, label, label.encode(), EC_PARAMS_BY_CRV["P-384"])


def _rsa_public_with_another_modulus(session: Any, label: str) -> None:
    """The private object reveals its modulus; the public object with its ID has another."""
    import_rsa(session, rsa.generate_private_key(65537, 2048), label)
    other = rsa.generate_private_key(65537, 2048).public_key()
    import_public(session, other, label, label.encode())


# (id, set-up in the token, extra CLI arguments given the label, expected reason)
CASES: list[tuple[str, Setup, Callable[[str], list[str]], str]] = [
    ("unknown key label", _nothing, lambda lbl: ["--key-label", lbl], "key_not_found"),
    (
        "existing label with --generate",
        _aes,
        lambda lbl: ["--key-label", lbl, "--generate", "oct-256"],
        "key_label_exists",
    ),
    ("two keys with the label", _two_aes, lambda lbl: ["--key-label", lbl], "key_ambiguous"),
    ("RSA-1024 in the token", _rsa_1024, lambda lbl: ["--key-label", lbl], "unsupported_target"),
    ("EC P-224 in the token", _ec_p224, lambda lbl: ["--key-label", lbl], "unsupported_curve"),
    (
        "non-extractable key",
        _unextractable_aes,
        lambda lbl: ["--key-label", lbl],
        "key_not_extractable",
    ),
    ("EC key without public object", _ec_without_public, _label, "key_not_found"),
    (
        "EC key, public object of another key with the label",
        _ec_with_orphan_public,
        _label,
        "public_key_mismatch",
    ),
    (
        "EC public object with the key's ID on another curve",
        _ec_public_on_another_curve,
        _label,
        "public_key_mismatch",
    ),
    (
        "RSA public object with the key's ID and another modulus",
        _rsa_public_with_another_modulus,
        _label,
        "public_key_mismatch",
    ),
]


def _refused(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], pin: str) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == EXIT_REFUSED, captured
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert len(captured.err.strip().splitlines()) == 1
    assert pin not in captured.err
    assert pin not in captured.out
    return captured.err


@pytest.mark.parametrize(
    ("setup", "extra", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_key_refusals(
    setup: Setup,
    extra: Callable[[str], list[str]],
    reason: str,
    softhsm: SoftHsm,
    kek: KekFiles,
    pin_env: str,
    label: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pkcs11 import Attribute

    with softhsm.session() as session:
        setup(session, label)
        before = len(list(session.get_objects({Attribute.LABEL: label})))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = wrap_args(softhsm, kek, out_dir / "k.byok", *extra(label))
    err = _refused(argv, out_dir, capsys, softhsm.pin)
    assert f"refused [{reason}]" in err
    with softhsm.session() as session:  # a refusal leaves the token as it was
        assert len(list(session.get_objects({Attribute.LABEL: label}))) == before


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"pin": "wrong-pin"}, "pin_incorrect"),
        ({"token": "no-such-token"}, "token_not_found"),
        ({"module": "/nonexistent/libpkcs11.so"}, "pkcs11_module_load"),
        ({"module": NOT_A_PKCS11_MODULE}, "pkcs11_module_load"),
    ],
    ids=["wrong PIN", "unknown token", "missing module", "not a PKCS#11 module"],
)
def test_token_refusals(
    change: dict[str, str],
    reason: str,
    softhsm: SoftHsm,
    kek: KekFiles,
    label: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    module = change.get("module", softhsm.module)
    pin = change.get("pin", softhsm.pin)
    monkeypatch.setenv(PIN_ENV, pin)
    token = SoftHsm(module, change.get("token", softhsm.token_label), pin, softhsm.conf)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = wrap_args(token, kek, out_dir / "k.byok", "--generate", "ec-p256", "--key-label", label)
    err = _refused(argv, out_dir, capsys, pin)
    assert f"refused [{reason}]" in err
    with softhsm.session() as session:  # nothing was generated
        from pkcs11 import Attribute

        assert list(session.get_objects({Attribute.LABEL: label})) == []
