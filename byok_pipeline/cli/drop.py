"""``byok drop DIR``: a drop folder for automation, beside an HSM vendor's tool on the connected
machine.

Each complete ``NAME.byok`` in DIR goes through ``byok upload`` (the same gate, the same
upload: the caller passes it in), with ``NAME.manifest.json`` and the ``NAME.approval-*.json``
beside it, as ``byok upload`` takes them. Then it moves, with those files and its marker, to
``DIR/uploaded/`` or ``DIR/refused/`` beside a one-line ``NAME.byok.reason``
(``REASON: message``). One log line per file and attempt (``--json``: one JSON object).

- **Complete**: a ``NAME.byok.done`` marker beside it, or else the same size and modification
  time at two polls in a row; with ``--done-marker`` only the marker counts.
- **Once**: a blob already waiting under the name with the same bytes is this upload, done
  before a restart; a package the HSM already holds (``already_imported``) is done too. Both
  move to ``uploaded/``.
- **Failures** that a retry may cure (storage or HSM down, no login, a setting missing) leave the
  files in place; the next poll tries again. Refusals (exit 2 of ``byok upload``, plaintext key
  material included: its content is never shown) move to ``refused/``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from byok_pipeline.cli.failures import classify
from byok_pipeline.core.errors import PipelineError, Rejected
from offline_packager.cli_exit import EXIT_REFUSED, one_line

#: ``byok upload`` of one package (and its manifest, None when there is none); its result.
Upload = Callable[[Path, Path | None], dict[str, Any]]
#: Where settled packages go, by outcome.
UPLOADED, REFUSED = "uploaded", "refused"
#: Refusals that mean the package is in already: a restart after its upload.
_DONE_BEFORE = frozenset({"already_imported"})


@dataclass(frozen=True)
class Outcome:
    """What became of one file at one attempt."""

    time: datetime
    file: str
    outcome: str  # uploaded, refused, retry
    reason: str
    message: str

    def to_json(self) -> dict[str, str]:
        """The log line's object."""
        return {
            "time": self.time.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "file": self.file,
            "outcome": self.outcome,
            "reason": self.reason,
            "message": self.message,
        }

    def line(self) -> str:
        """The log line for people."""
        when = self.time.strftime("%Y-%m-%dT%H:%M:%SZ")
        word = "will retry" if self.outcome == "retry" else self.outcome
        return f"{when} {self.file} {word} [{self.reason}]: {self.message}"


@dataclass
class DropFolder:
    """One drop folder; :meth:`poll` takes what is complete."""

    folder: Path
    upload: Upload
    log: Callable[[Outcome], None]
    done_marker: bool = False
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    _seen: dict[str, tuple[int, int]] = field(default_factory=dict)

    def poll(self) -> tuple[list[Outcome], int]:
        """Take every complete package once: its outcomes, and how many are not complete yet."""
        outcomes, pending = [], 0
        for path in sorted(self.folder.glob("*.byok")):
            if path.name.startswith(".") or not path.is_file():
                continue
            if self._complete(path):
                outcomes.append(self.take(path))
            else:
                pending += 1
        return outcomes, pending

    def _complete(self, path: Path) -> bool:
        if _marker(path).is_file():
            return True
        if self.done_marker:
            return False
        try:
            stat = path.stat()
        except FileNotFoundError:
            return False
        now = (stat.st_size, stat.st_mtime_ns)
        before = self._seen.get(path.name)
        self._seen[path.name] = now
        return before == now

    def take(self, path: Path) -> Outcome:
        """Upload one package and settle it; a failure that a retry may cure leaves it."""
        manifest = path.with_suffix(".manifest.json")
        try:
            result = self.upload(path, manifest if manifest.is_file() else None)
        except Exception as exc:  # noqa: BLE001  # every failure is one log line, never the end
            code, _, reason, message = classify(exc)
            if code == EXIT_REFUSED and path.is_file():  # else taken away meanwhile
                where = UPLOADED if reason in _DONE_BEFORE else REFUSED
                return self._settle(path, where, reason, message)
            outcome = Outcome(self.clock(), path.name, "retry", reason, one_line(message))
            self.log(outcome)
            return outcome
        if result.get("already_waiting"):
            text = f"already waiting in {result['container']} as {result['blob_name']}"
        else:
            text = f"uploaded to {result['container']} as {result['blob_name']}"
        text += f" (SHA-256 {result['package_sha256']})"
        return self._settle(path, UPLOADED, "uploaded", text)

    def _settle(self, path: Path, where: str, reason: str, message: str) -> Outcome:
        """The reason file, the companions, then the package itself (its move settles it: a
        restart before it takes the package again, and finds it done)."""
        outcome = Outcome(self.clock(), path.name, where, reason, one_line(message))
        target = _free_folder(self.folder / where, path.name)
        target.mkdir(parents=True, exist_ok=True)
        reason_file = target / f"{path.name}.reason"
        temp = reason_file.with_name(f".{reason_file.name}.tmp")
        temp.write_text(f"{reason}: {outcome.message}\n")
        temp.replace(reason_file)
        for companion in _companions(path):
            companion.replace(target / companion.name)
        path.replace(target / path.name)
        self._seen.pop(path.name, None)
        self.log(outcome)
        return outcome


def _marker(path: Path) -> Path:
    return path.with_name(f"{path.name}.done")


def _companions(path: Path) -> list[Path]:
    """The files that go with ``NAME.byok``: its manifest, its approvals, its marker."""
    stem = path.name.removesuffix(".byok")
    found = [path.with_suffix(".manifest.json"), _marker(path)]
    found += sorted(path.parent.glob(f"{stem}.approval-*.json"))
    return [p for p in found if p.is_file()]


def _free_folder(base: Path, name: str) -> Path:
    """``base``, or a sub-folder by time when a file of that name was settled there before."""
    if not (base / name).exists() and not (base / f"{name}.reason").exists():
        return base
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return base / stamp


def run_drop(
    folder: Path,
    *,
    upload: Upload,
    as_json: bool,
    once: bool,
    interval: float,
    done_marker: bool,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Poll ``folder`` every ``interval`` seconds until Ctrl-C (KeyboardInterrupt, left to the
    caller: 130); with ``once``, what is complete now (after a second look, for files without a
    marker) and exit: 1 when a file was left after a failure, else 0.

    Raises:
        Rejected: ``file_not_found``: no such folder.
        PipelineError: ``once`` left a file after a failure (its reason: exit 1).
        KeyboardInterrupt: Ctrl-C.
    """
    if not folder.is_dir():
        raise Rejected("file_not_found", f"drop folder {folder} is not a folder")

    def log(outcome: Outcome) -> None:
        print(json.dumps(outcome.to_json()) if as_json else outcome.line(), flush=True)

    drop = DropFolder(folder, upload=upload, log=log, done_marker=done_marker)
    if once:
        outcomes, pending = drop.poll()
        if pending and not done_marker:
            sleep(interval)
            more, _ = drop.poll()
            outcomes += more
        failed = [o for o in outcomes if o.outcome == "retry"]
        if failed:
            last = failed[-1]
            raise PipelineError(
                f"{len(failed)} file(s) left in {folder} for the next run: {last.message}",
                reason=last.reason,
            )
        return 0
    print(f"watching {folder} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    while True:
        drop.poll()
        sleep(interval)
