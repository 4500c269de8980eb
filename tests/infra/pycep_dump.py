"""Parse Bicep files with pycep-parser and print the parsed models as one JSON object.

Runs under the infrastructure virtualenv (.venv-infra), which has pycep-parser; the tests in the
main virtualenv call it by subprocess:

    .venv-infra/bin/python tests/infra/pycep_dump.py FILE.bicep [FILE.bicep ...]

Output: {"models": {path: model}, "errors": {path: message}} on stdout. A file that does not
parse is reported under "errors" rather than aborting, so one run covers every file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pycep import BicepParser


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write("usage: pycep_dump.py FILE.bicep [FILE.bicep ...]\n")
        return 2
    parser = BicepParser()
    models: dict[str, object] = {}
    errors: dict[str, str] = {}
    for name in argv:
        path = Path(name)
        try:
            models[name] = parser.parse(file_path=path)
        except Exception as exc:  # noqa: BLE001 - any parser failure is a finding to report
            errors[name] = f"{type(exc).__name__}: {exc}"
    json.dump({"models": models, "errors": errors}, sys.stdout, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
