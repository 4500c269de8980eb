"""The dependency direction of the layout (README "Layout"): import-linter's contracts in
pyproject.toml, plus what the Function process actually loads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env=env,
    )


def test_the_import_contracts_hold() -> None:
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def _copy(tmp: Path) -> Path:
    root = tmp / "repo"
    root.mkdir()
    shutil.copy(REPO / "pyproject.toml", root)
    for pkg in ("byok_pipeline", "offline_packager", "managed_hsm_emulator"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _lint_copy(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports over the copy at ``root`` (its packages first on the path)."""
    return _lint(root, {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_a_core_module_importing_azure_breaks_a_contract(tmp_path: Path) -> None:
    """The check can fail: an Azure import in the core (even inside a function) is caught."""
    root = _copy(tmp_path)
    status = root / "byok_pipeline" / "core" / "status.py"
    status.write_text(status.read_text() + "\n\ndef _late() -> None:\n    import azure.core\n")
    result = _lint_copy(root)
    assert result.returncode != 0
    assert "The pure core imports no Azure SDK BROKEN" in result.stdout


def test_an_upward_import_breaks_the_layers(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    target = root / "byok_pipeline" / "adapters" / "blobstore.py"
    target.write_text(target.read_text() + "\nfrom byok_pipeline.processing import runtime\n")
    result = _lint_copy(root)
    assert result.returncode != 0
    assert "byok_pipeline layers" in result.stdout
    assert "BROKEN" in result.stdout


def test_function_app_wires_only_and_loads_no_local_tooling() -> None:
    """function_app imports the runtime only; loading it (and the deps' code) pulls in
    neither the CLI, the local-development package, nor the emulator."""
    import ast

    tree = ast.parse((REPO / "function_app.py").read_text())
    imported = {
        alias.name if isinstance(node, ast.Import) else f"{node.module}"
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert {m for m in imported if m.startswith("byok_pipeline")} <= {
        "byok_pipeline.processing",
        "byok_pipeline.processing.runtime",
    }
    probe = (
        "import json, sys\n"
        "import function_app\n"
        "from byok_pipeline.processing import processor, wiring, reconcile\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(("
        "'managed_hsm_emulator', 'byok_pipeline.cli', 'byok_pipeline.localdev')))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(out.stdout) == []
