"""Build ``dist/byok-package-offline-VERSION.tar.gz``: what the air-gapped machine needs to
install ``byok-package``, and nothing else (``make offline-bundle``).

The project's own distribution (``pyproject.toml``) holds all three packages, the pipeline and
the emulator too, and the ``byok`` command: it cannot ship to the air-gapped machine as it is.
So ``offline_packager`` alone is built into a ``byok-package`` wheel from a minimal
``pyproject.toml`` generated in a temporary folder (version, Python requirement and dependency
ranges taken from the project's), then ``pip download --only-binary=:all:`` fetches the wheels
of its dependencies for the target: ``cryptography`` (and what it needs) and, for HSM mode,
``python-pkcs11``. Nothing is compiled, here or on the air-gapped machine.

python-pkcs11 0.10 ships wheels for CPython on Linux (manylinux x86_64 and aarch64, musllinux
x86_64), macOS (universal2) and Windows x64, not for 32-bit platforms: it needs no building for
the usual targets. It is bundled when a wheel exists for the target (``--with-pkcs11``: required,
the build fails without one; ``--without-pkcs11``: left out). ``bundle.json`` and the bundle's
README say whether HSM mode is in.

The target is this machine's Python and platform, or another one with ``--python-version 3.12``
and ``--platform TAG`` (repeatable; a pip platform tag such as ``manylinux_2_28_x86_64``, which
also admits older manylinux wheels, or ``win_amd64``, ``macosx_11_0_arm64``). Give such a bundle
its own ``--out``.

The bundle (one top folder ``byok-package-offline-VERSION/``): ``wheels/``, ``install.py``
(``scripts/offline_install.py``: checks ``SHA256SUMS``, creates a virtualenv, ``pip install
--no-index`` from ``wheels/`` alone), ``requirements.txt`` (every wheel pinned with its SHA-256,
for pip's hash-checking mode), ``bundle.json`` (the target), ``README.txt`` and ``SHA256SUMS``.
The Marvell roots installed in ``offline_packager/roots/`` (checked against their pins) ship
inside the wheel. Reproducible: the same inputs give the same bytes (sorted tar members, fixed
times: ``$SOURCE_DATE_EPOCH``, else 2020-01-01). The tarball's SHA-256 is printed and written
beside it (``.sha256``) for the ceremony form.

Usage: ``python scripts/build_offline_bundle.py [--out PATH] [--python-version X.Y]
[--platform TAG]... [--with-pkcs11 | --without-pkcs11] [--cache-dir DIR]``.
Exit 0 built, 1 with one line on any error.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from build_function_zip import candidate_files

REPO = Path(__file__).resolve().parent.parent
INSTALLER = REPO / "scripts" / "offline_install.py"
DIST_NAME = "byok-package"
PACKAGE = "offline_packager"
#: What offline_packager imports besides the standard library; their ranges come from
#: pyproject.toml. Any other project dependency belongs to the connected side and is not shipped.
RUNTIME_DEPENDENCIES = ("cryptography",)
HSM_EXTRA = "hsm"
#: 2020-01-01T00:00:00Z, as in build_function_zip.py.
FIXED_EPOCH = 1577836800
#: Never in the bundle, whatever a dependency declares.
FORBIDDEN_PREFIXES = ("azure", "byok-managed-hsm", "opentelemetry")
PRE_RELEASE = re.compile(r"\d(?:a|b|rc)\d|\.dev")  # PEP 440 pre- and dev releases
WHEEL_NAME = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[^-]+)-.+\.whl$")


class BuildError(Exception):
    """The bundle cannot be built; the message is the one line shown."""


@dataclass(frozen=True)
class Built:
    """What a build made: the wheels' file names, whether HSM mode is in, the tarball's facts."""

    wheels: list[str]
    pkcs11: bool
    sha256: str
    size: int


@dataclass(frozen=True)
class Project:
    """What the generated pyproject takes from the project's."""

    version: str
    requires_python: str
    license: str
    build_requires: tuple[str, ...]
    dependencies: tuple[str, ...]
    hsm: tuple[str, ...]


@dataclass(frozen=True)
class Target:
    """Which Python and platform the wheels are for; empty fields mean this machine's."""

    python_version: str = ""
    platforms: tuple[str, ...] = ()

    @property
    def python(self) -> str:
        """``X.Y``."""
        return self.python_version or f"{sys.version_info.major}.{sys.version_info.minor}"

    def pip_args(self) -> list[str]:
        """The ``pip download`` options that select this target."""
        args = ["--python-version", self.python_version] if self.python_version else []
        for platform in self.platforms:
            args += ["--platform", platform]
        return args

    def describe(self) -> list[str]:
        """The platform tags, or this machine's platform."""
        return list(self.platforms) or [sysconfig.get_platform().replace("-", "_")]


def _requirement_name(spec: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    return match.group(1).lower().replace("_", "-") if match else ""


def read_project(root: Path = REPO) -> Project:
    """The version and dependency ranges of ``pyproject.toml``, checked against the package.

    Raises:
        BuildError: the versions differ, or a runtime dependency is not declared.
    """
    data = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    project = data["project"]
    version = str(project["version"])
    init = (root / PACKAGE / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"$', init, re.MULTILINE)
    if not match or match.group(1) != version:
        found = match.group(1) if match else "none"
        raise BuildError(
            f"pyproject.toml says version {version}, {PACKAGE}/__init__.py says {found}: "
            "make them agree"
        )
    declared = {_requirement_name(spec): spec for spec in project.get("dependencies", [])}
    missing = [name for name in RUNTIME_DEPENDENCIES if name not in declared]
    if missing:
        raise BuildError(f"pyproject.toml does not declare {', '.join(missing)}")
    return Project(
        version=version,
        requires_python=str(project.get("requires-python", ">=3.11")),
        license=str(project.get("license", "MIT")),
        build_requires=tuple(data["build-system"]["requires"]),
        dependencies=tuple(declared[name] for name in RUNTIME_DEPENDENCIES),
        hsm=tuple(project.get("optional-dependencies", {}).get(HSM_EXTRA, [])),
    )


def _toml_list(items: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(json.dumps(item) for item in items) + "]"


def minimal_pyproject(project: Project) -> str:
    """A ``pyproject.toml`` for ``offline_packager`` alone, distribution ``byok-package``."""
    return f"""\
# Generated by scripts/build_offline_bundle.py: offline_packager alone, for the air-gapped machine.
[build-system]
requires = {_toml_list(project.build_requires)}
build-backend = "setuptools.build_meta"

[project]
name = "{DIST_NAME}"
version = "{project.version}"
description = "Air-gapped BYOK packager for Azure Key Vault Managed HSM (offline_packager)."
requires-python = {json.dumps(project.requires_python)}
license = {json.dumps(project.license)}
license-files = ["LICENSE"]
dependencies = {_toml_list(project.dependencies)}

[project.optional-dependencies]
{HSM_EXTRA} = {_toml_list(project.hsm)}

[project.scripts]
byok-package = "offline_packager.cli:main"

[tool.setuptools]
include-package-data = false

[tool.setuptools.packages.find]
include = ["{PACKAGE}*"]

[tool.setuptools.package-data]
"*" = ["*.json"]
"{PACKAGE}" = ["roots/*.pem", "roots/README.md"]
"""


def installed_roots(root: Path = REPO) -> list[str]:
    """The pinned Marvell roots installed in ``offline_packager/roots/``, each checked against
    its pin (a file that fails its pin stops the build)."""
    from offline_packager.attestation import PINNED_ROOTS, pinned_roots
    from offline_packager.errors import ByokError

    folder = root / PACKAGE / "roots"
    saved = os.environ.get("BYOK_VENDOR_ROOTS")
    os.environ["BYOK_VENDOR_ROOTS"] = str(folder)
    try:
        anchors = pinned_roots(require_all=False)
    except ByokError as exc:
        raise BuildError(f"{folder}: {exc}") from None
    finally:
        if saved is None:
            del os.environ["BYOK_VENDOR_ROOTS"]
        else:
            os.environ["BYOK_VENDOR_ROOTS"] = saved
    return sorted(PINNED_ROOTS[anchor.label][0] for anchor in anchors)


def stage_sources(dest: Path, project: Project, roots: list[str], root: Path = REPO) -> None:
    """Copy the package's files (those git would commit) and write the minimal pyproject."""
    wanted = [
        name
        for name in candidate_files(root)
        if name.startswith(f"{PACKAGE}/")
        and "__pycache__" not in name
        and (name.endswith((".py", ".json")) or name == f"{PACKAGE}/roots/README.md")
    ]
    wanted += [f"{PACKAGE}/roots/{name}" for name in roots]
    for name in sorted(set(wanted)):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / name, target)
    shutil.copyfile(root / "LICENSE", dest / "LICENSE")
    (dest / "pyproject.toml").write_text(minimal_pyproject(project), encoding="utf-8")


def _pip(args: list[str], *, env: dict[str, str] | None = None) -> None:
    """Run pip; on failure raise its first ``ERROR`` line."""
    argv = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        errors = [
            line
            for line in lines
            if line.startswith("ERROR") and not line.startswith("ERROR: Ignored")
        ]
        raise BuildError(f"pip {args[0]} failed: {(errors or lines[-1:] or ['no output'])[0]}")


def build_wheel(stage: Path, out_dir: Path, *, epoch: int, cache: list[str]) -> Path:
    """Build the ``byok-package`` wheel from the staged sources (file times from ``epoch``)."""
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
    _pip(["wheel", "--no-deps", "--wheel-dir", str(out_dir), *cache, str(stage)], env=env)
    wheels = sorted(out_dir.glob("byok_package-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"pip wheel made {len(wheels)} byok_package wheels, expected one")
    return wheels[0]


def download_dependencies(
    wheel: Path, dest: Path, target: Target, *, pkcs11: str, cache: list[str]
) -> bool:
    """``pip download --only-binary=:all:`` the wheel's dependencies into ``dest`` (the wheel
    itself too). ``pkcs11`` is ``auto``, ``yes`` or ``no``; returns whether python-pkcs11 is in.

    Raises:
        BuildError: a wheel is missing for the target (python-pkcs11 only with ``yes``).
    """

    def fetch(requirement: str, into: Path) -> None:
        _pip(
            [
                "download",
                "--only-binary=:all:",
                "--dest",
                str(into),
                *target.pip_args(),
                *cache,
                requirement,
            ]
        )

    if pkcs11 == "no":
        fetch(str(wheel), dest)
        return False
    attempt = dest.parent / "with-hsm"
    try:
        fetch(f"{wheel}[{HSM_EXTRA}]", attempt)
    except BuildError as exc:
        if pkcs11 == "yes":
            raise BuildError(
                f"--with-pkcs11: the wheels for Python {target.python} on "
                f"{', '.join(target.describe())} cannot all be downloaded ({exc})"
            ) from None
        fetch(str(wheel), dest)  # fails alone when python-pkcs11 was not the cause
        print(
            f"build: python-pkcs11 has no wheel for Python {target.python} on "
            f"{', '.join(target.describe())}: bundled without HSM mode ({exc})",
            file=sys.stderr,
        )
        return False
    attempt.rename(dest)
    return True


def _check_wheels(wheels: list[Path]) -> list[tuple[str, str, Path]]:
    """(name, version, path) per wheel; refuses anything of the connected side."""
    found = []
    for path in wheels:
        match = WHEEL_NAME.match(path.name)
        if not match:
            raise BuildError(f"{path.name} is not a wheel file name")
        name = match.group("name").lower().replace("_", "-")
        if name.startswith(FORBIDDEN_PREFIXES):
            raise BuildError(f"{path.name} would be in the offline bundle: it must not")
        version = match.group("version")
        if PRE_RELEASE.search(version):
            print(
                f"build: warning: {name} {version} is a pre-release (no final release has a "
                "wheel for this target)",
                file=sys.stderr,
            )
        found.append((name, version, path))
    return found


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _readme(
    project: Project, target: Target, pkcs11: bool, wheels: list[str], roots: list[str]
) -> str:
    top = f"byok-package-offline-{project.version}"
    hsm = (
        "included: HSM mode (--pkcs11-module) works"
        if pkcs11
        else "NOT included: software keys only (--key, --generate); no HSM mode"
    )
    root_line = (
        ", ".join(roots)
        if roots
        else (
            "none; install them as offline_packager/roots/README.md\n"
            "               (in the wheel) says, or put them in $BYOK_VENDOR_ROOTS"
        )
    )
    wheel_lines = "".join(f"  wheels/{name}\n" for name in wheels)
    title = f"byok-package {project.version}: offline installation bundle"
    return f"""\
{title}
{"=" * len(title)}

Installs the air-gapped packager byok-package (offline_packager: standard library +
cryptography, + python-pkcs11 for HSM mode) and nothing of the connected side (no azure.*).

Target:        CPython {target.python} on {", ".join(target.describe())} (each wheel's file name
               below carries the platform it needs: manylinux_2_34 means glibc 2.34 or later)
python-pkcs11: {hsm}
Marvell roots: {root_line}

On the air-gapped machine (Python {target.python} with its venv module; no network is used):

  sha256sum {top}.tar.gz          # compare with the value on the ceremony form
  tar -xzf {top}.tar.gz
  python3 {top}/install.py --venv byok-package-venv
  byok-package-venv/bin/byok-package --version

install.py first checks every file against SHA256SUMS and that wheels/ holds nothing unlisted;
any difference is refused with one line (exit 2) before anything is installed. It then creates
the virtualenv and runs pip install --no-index --find-links wheels --require-hashes
-r requirements.txt, ignoring pip's configuration files and PIP_* variables: only these wheels,
each checked again by pip. It ends by printing byok-package --version. On Windows:
py install.py --venv byok-package-venv, then byok-package-venv\\Scripts\\byok-package.exe.
Exit codes: 0 installed, 2 refused, 1 failed (e.g. python3-venv missing), 130 interrupted.

SHA256SUMS can also be checked by hand: cd {top} && sha256sum -c SHA256SUMS

Contents:
  README.txt, install.py, bundle.json (the target), requirements.txt (pins and hashes),
  SHA256SUMS
{wheel_lines}"""


def assemble(
    bundle: Path,
    project: Project,
    target: Target,
    *,
    pkcs11: bool,
    wheels_dir: Path,
    roots: list[str],
) -> list[str]:
    """Write the bundle's folder; return the wheel file names."""
    (bundle / "wheels").mkdir(parents=True)
    found = _check_wheels(sorted(wheels_dir.glob("*.whl")))
    for _, _, path in found:
        shutil.copyfile(path, bundle / "wheels" / path.name)
    names = [path.name for _, _, path in found]
    shutil.copyfile(INSTALLER, bundle / "install.py")
    (bundle / "requirements.txt").write_text(
        "# Every wheel of this bundle, pinned with its SHA-256 (pip --require-hashes).\n"
        + "".join(
            f"{name}=={version} --hash=sha256:{_sha256(path)}\n" for name, version, path in found
        ),
        encoding="utf-8",
    )
    meta = {
        "bundle_format": 1,
        "name": DIST_NAME,
        "version": project.version,
        "python": target.python,
        "platforms": target.describe(),
        "built_for": "another machine (--python-version/--platform)"
        if target.python_version or target.platforms
        else "the building machine's Python and platform",
        "pkcs11": pkcs11,
        "vendor_roots": roots,
        "wheels": names,
    }
    (bundle / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (bundle / "README.txt").write_text(
        _readme(project, target, pkcs11, names, roots), encoding="utf-8"
    )
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    (bundle / "SHA256SUMS").write_text(
        "".join(f"{_sha256(bundle / name)}  {name}\n" for name in files), encoding="utf-8"
    )
    return names


def write_tarball(folder: Path, out: Path, *, epoch: int) -> None:
    """``folder`` as a gzip tarball under its own name: sorted members, fixed times, owners and
    modes, no gzip time stamp; written to a temp file renamed into place."""
    members = [folder, *sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).parts)]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".offline-bundle-", suffix=".tar.gz")
    os.close(fd)
    try:
        with (
            Path(tmp).open("wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for path in members:
                info = tarfile.TarInfo(path.relative_to(folder.parent).as_posix())
                info.mtime = epoch
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if path.is_dir():
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                    continue
                data = path.read_bytes()
                info.size = len(data)
                info.mode = 0o755 if path.name == "install.py" else 0o644
                tar.addfile(info, io.BytesIO(data))
        Path(tmp).chmod(0o644)
        Path(tmp).replace(out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build(
    out: Path,
    target: Target,
    *,
    pkcs11: str = "auto",
    cache_dir: str | None = None,
    root: Path = REPO,
) -> Built:
    """Build the bundle at ``out``; return what it holds (for the summary line)."""
    project = read_project(root)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or FIXED_EPOCH)
    cache = ["--cache-dir", cache_dir] if cache_dir else []
    roots = installed_roots(root)
    with tempfile.TemporaryDirectory(prefix="byok-offline-bundle-") as tmp_name:
        tmp = Path(tmp_name)
        stage_sources(tmp / "src", project, roots, root)
        wheel = build_wheel(tmp / "src", tmp / "built", epoch=epoch, cache=cache)
        with_pkcs11 = download_dependencies(
            wheel, tmp / "wheels", target, pkcs11=pkcs11, cache=cache
        )
        if not (tmp / "wheels" / wheel.name).is_file():
            shutil.copyfile(wheel, tmp / "wheels" / wheel.name)
        bundle = tmp / "out" / f"byok-package-offline-{project.version}"
        names = assemble(
            bundle, project, target, pkcs11=with_pkcs11, wheels_dir=tmp / "wheels", roots=roots
        )
        write_tarball(bundle, out, epoch=epoch)
    digest = _sha256(out)
    out.with_name(out.name + ".sha256").write_text(f"{digest}  {out.name}\n", encoding="utf-8")
    return Built(names, with_pkcs11, digest, out.stat().st_size)


def _python_version(text: str) -> str:
    if not re.fullmatch(r"3\.\d{1,2}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not X.Y, e.g. 3.12")
    return text


def main(argv: list[str] | None = None) -> int:
    """Command line (``make offline-bundle BUNDLE_ARGS=...``)."""
    parser = argparse.ArgumentParser(
        prog="build_offline_bundle.py",
        description="Build the air-gapped install bundle of byok-package: its wheel, its "
        "dependencies' wheels for the target, install.py, SHA256SUMS. Exit 0 built, 1 error.",
    )
    parser.add_argument(
        "--out", help="the tarball (default dist/byok-package-offline-VERSION.tar.gz)"
    )
    parser.add_argument(
        "--python-version",
        type=_python_version,
        metavar="X.Y",
        help="the target's Python (default: this one)",
    )
    parser.add_argument(
        "--platform",
        action="append",
        default=[],
        metavar="TAG",
        help="a pip platform tag of the target, repeatable, e.g. "
        "manylinux_2_28_x86_64, win_amd64 (default: this machine)",
    )
    hsm = parser.add_mutually_exclusive_group()
    hsm.add_argument(
        "--with-pkcs11",
        dest="pkcs11",
        action="store_const",
        const="yes",
        help="require python-pkcs11 (HSM mode); fail if it has no wheel for the target",
    )
    hsm.add_argument(
        "--without-pkcs11",
        dest="pkcs11",
        action="store_const",
        const="no",
        help="leave python-pkcs11 out (default: in when a wheel exists)",
    )
    parser.add_argument("--cache-dir", help="pip's cache folder (default: pip's own)")
    args = parser.parse_args(argv)
    target = Target(args.python_version or "", tuple(args.platform))
    try:
        version = read_project().version
        out = Path(args.out or REPO / "dist" / f"byok-package-offline-{version}.tar.gz")
        summary = build(out, target, pkcs11=args.pkcs11 or "auto", cache_dir=args.cache_dir)
    except BuildError as exc:
        print(f"build: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"build: {exc.filename or ''} {exc.strerror or exc}".strip(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("build: interrupted; nothing written", file=sys.stderr)
        return 130
    hsm_note = "with python-pkcs11" if summary.pkcs11 else "without python-pkcs11"
    lines = [
        (
            f"{out}: {len(summary.wheels)} wheels ({hsm_note}), {summary.size} bytes, "
            f"sha256 {summary.sha256}"
        ),
        *(f"  {name}" for name in summary.wheels),
    ]
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:  # `| head`: the bundle is built all the same
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as Python's docs do
    return 0


if __name__ == "__main__":
    sys.exit(main())
