"""The air-gapped install (`make offline-bundle`): the bundle carries `offline_packager` and its
dependencies' wheels and nothing of the connected side; its install script, run with no network
at all (a network namespace of its own when `unshare` allows one, else an index on a closed
port), installs `byok-package` into a fresh virtualenv that then wraps a key; a tampered or
added wheel is refused before anything is installed; the build is reproducible.

The build downloads wheels from the package index (pip's cache in a temporary folder)."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from testsupport import REPO, make_kid, write_kek

from offline_packager.kek import spki_sha256
from offline_packager.package_format import parse_package
from offline_packager.wrap import unwrap_target

BUILD = REPO / "scripts" / "build_offline_bundle.py"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
TOP = f"byok-package-offline-{VERSION}"
README_MARKER = "# offline-bundle-install"
#: Nothing of the connected side may be in the bundle.
CONNECTED = ("azure", "byok_pipeline", "managed_hsm_emulator", "opentelemetry", "byok_managed_hsm")


def _build(out: Path, cache: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BUILD), "--out", str(out), "--cache-dir", str(cache), *options],
        capture_output=True, text=True, cwd=REPO, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pip_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip's cache for this module's builds."""
    return tmp_path_factory.mktemp("pip-cache")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, pip_cache: Path) -> Path:
    """The tarball, built once for this module (this machine's Python and platform)."""
    out = tmp_path_factory.mktemp("dist") / f"{TOP}.tar.gz"
    done = _build(out, pip_cache)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith(f"{out}: 6 wheels (with python-pkcs11), ")
    return out


def _unpack(bundle: Path, into: Path) -> Path:
    with tarfile.open(bundle) as tar:
        tar.extractall(into, filter="data")
    return into / TOP


def _no_network() -> list[str]:
    """A command prefix that runs its command in a network namespace with no interface up
    (``unshare -rn``), or nothing when this machine does not allow one."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], check=False).returncode == 0:
        return [unshare, "-rn"]
    return []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _offline_env() -> dict[str, str]:
    """This environment with every route to an index closed: a dead index, no extra index,
    a dead proxy, and nothing of this repository on the path."""
    dead = f"http://127.0.0.1:{_closed_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env |= {"PIP_INDEX_URL": f"{dead}/simple", "PIP_EXTRA_INDEX_URL": f"{dead}/extra",
            "PIP_FIND_LINKS": dead, "HTTP_PROXY": dead, "HTTPS_PROXY": dead,
            "http_proxy": dead, "https_proxy": dead}  # fmt: skip
    return env


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_no_network(), *argv], cwd=cwd, env=_offline_env(), capture_output=True, text=True,
        check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_the_bundle_holds_only_the_packager_and_its_dependencies(
    bundle: Path, tmp_path: Path
) -> None:
    with tarfile.open(bundle) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[0] == TOP
    assert all(n == TOP or n.startswith(f"{TOP}/") for n in names)
    assert names == sorted(names, key=lambda n: n.split("/"))
    assert {m.mtime for m in members} == {1577836800}
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}
    folder = _unpack(bundle, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.txt", "SHA256SUMS", "bundle.json", "install.py", "requirements.txt", "wheels"
    ]  # fmt: skip
    wheels = sorted(p.name for p in (folder / "wheels").iterdir())
    projects = {w.split("-")[0].lower() for w in wheels}
    assert {"byok_package", "cryptography", "cffi", "python_pkcs11"} <= projects
    assert not [w for w in wheels if w.lower().startswith(CONNECTED)]
    # every file is in SHA256SUMS with its digest, and requirements.txt pins every wheel
    sums = {
        name: digest
        for digest, name in (
            line.split("  ", 1) for line in (folder / "SHA256SUMS").read_text().splitlines()
        )
    }
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(sums) == [f for f in files if f != "SHA256SUMS"]
    for name, digest in sums.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    pins = [line for line in (folder / "requirements.txt").read_text().splitlines()
            if not line.startswith("#")]  # fmt: skip
    assert len(pins) == len(wheels)
    assert all(
        p.split("--hash=sha256:")[1] == sums[f"wheels/{w}"]
        for p, w in zip(pins, wheels, strict=True)
    )
    meta = json.loads((folder / "bundle.json").read_text())
    assert meta["version"] == VERSION
    assert meta["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert meta["pkcs11"] is True
    assert (folder / "install.py").read_bytes() == (
        REPO / "scripts/offline_install.py"
    ).read_bytes()
    assert "install.py --venv byok-package-venv" in (folder / "README.txt").read_text()
    # the byok-package wheel: offline_packager alone, with its schemas, one command
    (ours,) = [w for w in wheels if w.startswith("byok_package-")]
    with zipfile.ZipFile(folder / "wheels" / ours) as zf:
        entries = zf.namelist()
        entry_points = zf.read(f"byok_package-{VERSION}.dist-info/entry_points.txt").decode()
        metadata = zf.read(f"byok_package-{VERSION}.dist-info/METADATA").decode()
    assert {e.split("/")[0] for e in entries} == {
        "offline_packager",
        f"byok_package-{VERSION}.dist-info",
    }
    assert "offline_packager/schemas/manifest.schema.json" in entries
    assert "offline_packager/roots/README.md" in entries
    assert not [e for e in entries if "__pycache__" in e]
    shipped = {e for e in entries if e.startswith("offline_packager/") and e.endswith(".py")}
    assert shipped == {
        p.relative_to(REPO).as_posix() for p in (REPO / "offline_packager").glob("*.py")
    }
    assert entry_points.split() == [
        "[console_scripts]",
        "byok-package",
        "=",
        "offline_packager.cli:main",
    ]
    assert f"Version: {VERSION}" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert len(requires) == 2
    assert "cryptography" in requires[0]
    assert "python-pkcs11" in requires[1]
    assert 'extra == "hsm"' in requires[1]


def _readme_commands() -> list[str]:
    """The README's "Install byok-package on the air-gapped machine" block, comments dropped."""
    text = (REPO / "README.md").read_text()
    block = text.split(README_MARKER + "\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.slow
def test_the_readme_install_works_with_no_network_and_the_tool_wraps_a_key(
    bundle: Path, tmp_path: Path
) -> None:
    """The README's commands, from the tarball on the medium: with no route to any index the
    script installs, prints the version, and the installed `byok-package` wraps a key that the
    KEK's private half unwraps; nothing of azure.* or the pipeline is importable there."""
    commands = _readme_commands()
    assert commands[0] == "make offline-bundle"  # what the fixture built, into tmp_path
    makefile = (REPO / "Makefile").read_text()
    assert "offline-bundle: $(VENV)/.stamp\n\t$(PY) scripts/build_offline_bundle.py" in makefile
    shutil.copyfile(bundle, tmp_path / bundle.name)
    outputs = []
    for command in commands[1:]:
        argv = shlex.split(command.replace("VERSION", VERSION))
        if argv[0] == "python3":
            argv[0] = sys.executable
        done = _run(argv, tmp_path)
        assert done.returncode == 0, (command, done.stderr)
        outputs.append(done.stdout)
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert outputs[0] == f"{digest}  {bundle.name}\n"
    assert Path(f"{bundle}.sha256").read_text() == outputs[0]
    assert f"byok-package {VERSION}\n" in outputs[2]
    assert "HSM mode available" in outputs[2]
    assert outputs[-1] == f"byok-package {VERSION}\n"

    venv = tmp_path / "byok-package-venv"
    python = venv / "bin" / "python"
    kek = rsa.generate_private_key(65537, 2048)
    kek_pem, _ = write_kek(tmp_path, kek)
    kid = make_kid()
    wrap = _run([str(venv / "bin" / "byok-package"), "wrap", "--kek", str(kek_pem),
                 "--kek-kid", kid, "--kek-sha256", spki_sha256(kek.public_key()),
                 "--generate", "ec-p256", "--out", "payments-2026.byok", "--json"], tmp_path)  # fmt: skip
    assert wrap.returncode == 0, wrap.stderr
    assert json.loads(wrap.stdout)["status"] == "ok"
    package = parse_package((tmp_path / "payments-2026.byok").read_bytes())
    plain = unwrap_target(kek, package.ciphertext).reveal()
    key = serialization.load_der_private_key(plain, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    inspect = _run([str(venv / "bin" / "byok-package"), "inspect", "payments-2026.byok",
                    "--kek", str(kek_pem)], tmp_path)  # fmt: skip
    assert inspect.returncode == 0, inspect.stdout + inspect.stderr

    where = _run(
        [str(python), "-c", "import offline_packager, pkcs11; print(offline_packager.__file__)"],
        tmp_path,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv)
    for module in ("azure", "byok_pipeline", "managed_hsm_emulator"):
        missing = _run([str(python), "-c", f"import {module}"], tmp_path)
        assert missing.returncode == 1
        assert f"No module named '{module}'" in missing.stderr


def _medium(bundle: Path, tmp_path: Path) -> Path:
    """The bundle unpacked, as the custodian has it from the medium (to tamper with)."""
    return _unpack(bundle, tmp_path / "medium")


def _install(folder: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The bundle's install.py, with no network, into ``tmp_path/venv``."""
    return _run([sys.executable, str(folder / "install.py"), "--venv", "venv"], tmp_path)


@pytest.mark.slow
def test_a_tampered_wheel_is_refused_before_anything_is_installed(
    bundle: Path, tmp_path: Path
) -> None:
    folder = _medium(bundle, tmp_path)
    (wheel,) = (folder / "wheels").glob("cryptography-*.whl")
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0x01
    wheel.write_bytes(bytes(data))
    done = _install(folder, tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(
        f"install: refused [checksum_mismatch]: wheels/{wheel.name} does not match SHA256SUMS"
    )
    assert "do not install from it" in done.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.slow
def test_a_wheel_added_or_removed_is_refused(bundle: Path, tmp_path: Path) -> None:
    folder = _medium(bundle, tmp_path)
    (ours,) = (folder / "wheels").glob("byok_package-*.whl")
    shutil.copyfile(ours, folder / "wheels" / "byok_package-9.9.9-py3-none-any.whl")
    done = _install(folder, tmp_path)
    assert done.returncode == 2
    assert done.stderr == (
        "install: refused [unlisted_file]: wheels/byok_package-9.9.9-py3-none-any.whl is not "
        "listed in SHA256SUMS: the bundle was altered; do not install from it, get a fresh copy\n"
    )
    (folder / "wheels" / "byok_package-9.9.9-py3-none-any.whl").unlink()
    ours.unlink()
    done = _install(folder, tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(
        f"install: refused [checksum_mismatch]: wheels/{ours.name} is missing"
    )
    assert not (tmp_path / "venv").exists()


@pytest.mark.slow
def test_a_bundle_for_another_python_is_refused(bundle: Path, tmp_path: Path) -> None:
    """bundle.json names the target; a consistent bundle for another Python is refused there."""
    folder = _medium(bundle, tmp_path)
    meta = json.loads((folder / "bundle.json").read_text())
    meta["python"] = "3.99"
    (folder / "bundle.json").write_text(json.dumps(meta))
    sums = (folder / "SHA256SUMS").read_text().splitlines()
    digest = hashlib.sha256((folder / "bundle.json").read_bytes()).hexdigest()
    (folder / "SHA256SUMS").write_text(
        "".join(
            f"{digest}  bundle.json\n" if line.endswith("  bundle.json") else line + "\n"
            for line in sums
        )
    )
    done = _install(folder, tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("install: refused [wrong_python]: this bundle is for Python 3.99")
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / "venv").exists()


@pytest.mark.slow
def test_the_build_is_reproducible(bundle: Path, pip_cache: Path, tmp_path: Path) -> None:
    again = tmp_path / bundle.name
    done = _build(again, pip_cache)
    assert done.returncode == 0, done.stderr
    assert again.read_bytes() == bundle.read_bytes()


@pytest.mark.slow
def test_without_pkcs11_the_bundle_has_no_hsm_mode(pip_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / f"{TOP}.tar.gz"
    done = _build(out, pip_cache, "--without-pkcs11")
    assert done.returncode == 0, done.stderr
    assert "wheels (without python-pkcs11)" in done.stdout
    folder = _unpack(out, tmp_path)
    wheels = sorted(p.name for p in (folder / "wheels").iterdir())
    assert not [w for w in wheels if w.startswith(("python_pkcs11", "asn1crypto"))]
    assert json.loads((folder / "bundle.json").read_text())["pkcs11"] is False
    assert "pkcs11" not in (folder / "requirements.txt").read_text()
    assert "python-pkcs11: NOT included" in (folder / "README.txt").read_text()


@pytest.fixture
def build_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """scripts/build_offline_bundle.py as a module."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    return importlib.import_module("build_offline_bundle")


def test_the_build_refuses_a_version_the_package_does_not_carry(
    build_script: Any, tmp_path: Path
) -> None:
    (tmp_path / "offline_packager").mkdir()
    (tmp_path / "offline_packager" / "__init__.py").write_text('__version__ = "0.1.0"\n')
    (tmp_path / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=77"]\n'
        '[project]\nname = "x"\nversion = "0.2.0"\ndependencies = ["cryptography>=44"]\n'
    )
    with pytest.raises(
        build_script.BuildError,
        match=r"version 0\.2\.0, offline_packager/__init__\.py says 0\.1\.0",
    ):
        build_script.read_project(tmp_path)
    (tmp_path / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=77"]\n'
        '[project]\nname = "x"\nversion = "0.1.0"\ndependencies = []\n'
    )
    with pytest.raises(build_script.BuildError, match="does not declare cryptography"):
        build_script.read_project(tmp_path)


def test_the_generated_pyproject_takes_the_projects_facts(build_script: Any) -> None:
    project = build_script.read_project()
    text = build_script.minimal_pyproject(project)
    generated = tomllib.loads(text)
    ours = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert generated["project"]["name"] == "byok-package"
    assert generated["project"]["version"] == ours["project"]["version"]
    assert generated["project"]["requires-python"] == ours["project"]["requires-python"]
    assert generated["project"]["dependencies"] == ours["project"]["dependencies"]
    assert (
        generated["project"]["optional-dependencies"]["hsm"]
        == ours["project"]["optional-dependencies"]["hsm"]
    )
    assert generated["project"]["scripts"] == {"byok-package": "offline_packager.cli:main"}
    assert generated["build-system"] == {**ours["build-system"]}
    assert "byok_pipeline" not in text
    assert "managed_hsm_emulator" not in text


def test_a_wheel_of_the_connected_side_stops_the_build(build_script: Any, tmp_path: Path) -> None:
    bad = tmp_path / "azure_core-1.30.0-py3-none-any.whl"
    bad.write_bytes(b"")
    with pytest.raises(build_script.BuildError, match="must not"):
        build_script._check_wheels([bad])


def test_an_installed_root_that_fails_its_pin_stops_the_build(
    build_script: Any, tmp_path: Path
) -> None:
    """Marvell roots found in offline_packager/roots/ ship in the wheel only if they match
    their pins; none installed ships none."""
    roots = tmp_path / "offline_packager" / "roots"
    roots.mkdir(parents=True)
    assert build_script.installed_roots(tmp_path) == []
    (roots / "marvell-liquidsecurity-ls1-root.pem").write_text("not a certificate\n")
    with pytest.raises(build_script.BuildError, match="is not one PEM certificate"):
        build_script.installed_roots(tmp_path)
