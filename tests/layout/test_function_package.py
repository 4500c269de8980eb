"""The deployment package: `make package` ships exactly what the Function runs, and it runs.

The zip is unpacked into an empty folder, requirements.txt is installed into a fresh venv
(nothing of this repository on its path) and `function_app` is imported there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "scripts" / "build_function_zip.py"
TOP_LEVEL = {
    "function_app.py",
    "host.json",
    "requirements.txt",
    "byok_pipeline",
    "offline_packager",
}
NEVER = (
    "tests/",
    "managed_hsm_emulator/",
    "node_modules/",
    "byok_pipeline/cli/",
    "byok_pipeline/localdev/",
    "offline_packager/roots/",
    ".venv",
    "benchmarks/",
    "scripts/",
    "infra/",
    "docs/",
)


def _build(out: Path) -> list[str]:
    subprocess.run(
        [sys.executable, str(BUILD), "--out", str(out)], check=True, capture_output=True, cwd=REPO
    )
    with zipfile.ZipFile(out) as zf:
        return zf.namelist()


def test_the_zip_holds_exactly_what_the_function_needs(tmp_path: Path) -> None:
    names = _build(tmp_path / "function-app.zip")
    assert {n.split("/")[0] for n in names} == TOP_LEVEL
    assert not [n for n in names if n.startswith(NEVER)]
    assert not [n for n in names if "local.settings" in n or "__pycache__" in n]
    assert not [n for n in names if n.endswith((".md", ".pem", ".key", ".byok"))]
    for needed in (
        "byok_pipeline/processing/runtime.py",
        "byok_pipeline/core/status.py",
        "byok_pipeline/schemas/status.schema.json",
        "byok_pipeline/core/dashboard_assets/dashboard.css",  # the page's assets ship inside
        "byok_pipeline/core/dashboard_assets/dashboard.js",
        "offline_packager/package_format.py",
    ):
        assert needed in names
    # every Python module the package holds is one the repository has (no stale copies)
    assert all((REPO / n).is_file() for n in names)


def test_the_build_is_reproducible(tmp_path: Path) -> None:
    _build(tmp_path / "a.zip")
    _build(tmp_path / "b.zip")
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()


def test_the_build_refuses_a_funcignore_that_drops_the_app(tmp_path: Path) -> None:
    """A .funcignore that ignores function_app.py is refused with one line, and no zip."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("host.json", "requirements.txt"):
        (root / name).write_text((REPO / name).read_text())
    (root / "function_app.py").write_text("")
    (root / ".funcignore").write_text("function_app.py\n")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import build_function_zip as b\n"
        "from pathlib import Path\n"
        "b.build(Path(sys.argv[2]) / 'x.zip', Path(sys.argv[3]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(BUILD.parent), str(tmp_path), str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "leaves out function_app.py" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.zip").exists()


@pytest.mark.slow
def test_the_unpacked_zip_imports_in_a_fresh_venv_from_requirements_alone(tmp_path: Path) -> None:
    _build(tmp_path / "function-app.zip")
    app = tmp_path / "app"
    with zipfile.ZipFile(tmp_path / "function-app.zip") as zf:
        zf.extractall(app)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-r",
            str(app / "requirements.txt"),
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=900,
    )
    probe = (
        "import json, sys\n"
        "import function_app\n"
        "names = sorted(str(f.get_function_name()) for f in function_app.app.get_functions())\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('managed_hsm_emulator', "
        "'byok_pipeline.cli', 'byok_pipeline.localdev', 'tests')))\n"
        "print(json.dumps({'functions': names, 'bad': bad, 'file': function_app.__file__}))\n"
    )
    out = subprocess.run(
        [str(python), "-c", probe],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result = json.loads(out.stdout)
    assert result["functions"] == sorted(
        [
            "process_package",
            "process_approval",
            "reconcile",
            "list_packages",
            "get_package",
            "get_kek",
            "dashboard",
        ]
    )
    assert result["bad"] == []
    assert Path(result["file"]).parent == app
