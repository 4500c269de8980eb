"""``byok-package wrap-batch``: many keys under one KEK, each exactly as ``wrap`` packages it.

The KEK (and, with ``--pkcs11-module``, the token session) is opened once by the caller; each
key then goes through the same steps as ``wrap``: its name, its outputs checked, the key read
or generated (or found in the token) and wrapped, ``NAME.byok`` and ``NAME.manifest.json``
written atomically (:func:`~.packager.write_package`). A key that ``wrap`` would refuse is
refused here with the same reason, and the batch goes on; an interrupt stops it after the key in
flight is undone. Nothing of a refused or interrupted key is left on disk.

Reasons of the batch itself, per key: ``bad_key_name`` (the name is not 1-127 of 0-9 a-z A-Z -),
``duplicate_key_name`` (two entries name the same key, compared ignoring case: both refused),
``target_type_mismatch`` (the key is not of the type its CSV row states), ``bad_batch_row``,
``interrupted`` and ``internal`` (an unexpected error: a bug, the batch goes on).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from . import TOOL_NAME
from .atomic import check_writable, fsync_folder
from .batch_sources import BatchItem
from .cli_common import read_file
from .errors import ByokError
from .keytypes import TargetType
from .kid import is_key_name
from .packager import (
    KekContext,
    Outputs,
    Wrapped,
    package_facts,
    resolve_key_ops,
    wrap_software,
    write_package,
)
from .target_keys import PassphraseProvider, generate_target, load_target

if TYPE_CHECKING:
    from .pkcs11_source import TokenSession

SUMMARY_VERSION = 1
WRAPPED, REFUSED = "wrapped", "refused"
KEY_FIELDS = (
    "name",
    "source",
    "status",
    "reason",
    "message",
    "target_type",
    "key_ops",
    "fingerprint",
    "package",
    "manifest",
    "package_sha256",
)


@dataclass(frozen=True)
class KeyOutcome:
    """What became of one key: ``wrapped`` with its package's facts, or ``refused`` with a
    reason and a one-line message (never key material)."""

    name: str
    source: str
    status: str
    reason: str | None = None
    message: str | None = None
    facts: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The summary's entry for the key: always the fields of :data:`KEY_FIELDS`."""
        facts = self.facts or {}
        entry: dict[str, Any] = {
            "name": self.name,
            "source": self.source,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
        }
        for key in KEY_FIELDS[5:]:
            entry[key] = facts.get(key)
        return entry


@dataclass(frozen=True)
class BatchRun:
    """What every key of a batch shares: the KEK, the output folder, the clock, the passphrase
    of encrypted key files and the token session (None: no key comes from a token)."""

    ctx: KekContext
    out_dir: Path
    clock: Callable[[], datetime]
    force: bool = False
    passphrase: PassphraseProvider | None = None
    token: TokenSession | None = None


@dataclass
class BatchResult:
    """The outcomes in list order; ``interrupted`` when an interrupt stopped the batch."""

    planned: int
    outcomes: list[KeyOutcome] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)


class Progress:
    """One progress line on ``stream`` (stderr), redrawn in place at most every ``interval``
    seconds; silent unless the stream is a terminal."""

    def __init__(self, total: int, stream: TextIO | None = None, *, interval: float = 0.1) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = self._stream.isatty()
        self._total = total
        self._interval = interval
        self._drawn_at = -interval
        self._shown = False

    def update(self, result: BatchResult, current: str, *, now: bool = False) -> None:
        """Show how far ``result`` is, and the key being wrapped."""
        if not self.enabled:
            return
        tick = time.monotonic()
        if not now and tick - self._drawn_at < self._interval:
            return
        self._drawn_at = tick
        done = len(result.outcomes)
        shown = current if len(current) <= 40 else current[:37] + "..."
        self._stream.write(
            f"\r{TOOL_NAME} wrap-batch: {done}/{self._total} keys, {result.count(WRAPPED)} "
            f"wrapped, {result.count(REFUSED)} refused  {shown}\x1b[K"
        )
        self._stream.flush()
        self._shown = True

    def clear(self) -> None:
        """Erase the line (before another message is printed)."""
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = False

    def close(self, result: BatchResult) -> None:
        """Draw the final count and end the line."""
        if self.enabled:
            self.update(result, "", now=True)
            self._stream.write("\n")
            self._stream.flush()
            self._shown = False


Notice = Callable[[str], None]


def run_batch(
    items: Sequence[BatchItem], run: BatchRun, *, progress: Progress, notice: Notice
) -> BatchResult:
    """Wrap every item; a refusal is recorded and the batch goes on. ``notice`` gets one line
    per refused key and each distinct warning (e.g. SoftHSM's padding), to show on stderr.

    An interrupt (``KeyboardInterrupt``) stops the batch: the key in flight is recorded as
    refused (``interrupted``), nothing of it is left, and the keys after it are not attempted.
    """
    result = BatchResult(planned=len(items))
    duplicates = _duplicate_names(items)

    def say(line: str) -> None:
        progress.clear()
        notice(line)

    started = time.perf_counter()
    warned: set[str] = set()
    try:
        for item in items:
            progress.update(result, item.name)
            warnings: list[str] = []
            outcome = _attempt(item, run, warnings, duplicates.get(item.name.casefold()))
            result.outcomes.append(outcome)
            if outcome.reason == "interrupted":
                result.interrupted = True
                break
            for warning in warnings:
                if warning not in warned:
                    warned.add(warning)
                    say(f"{TOOL_NAME}: warning: {warning}")
            if outcome.status == REFUSED:
                say(f"{TOOL_NAME}: refused [{outcome.reason}]: {outcome.name}: {outcome.message}")
    except KeyboardInterrupt:  # between two keys: every key so far is complete
        result.interrupted = True
    finally:
        with contextlib.suppress(OSError):  # each file was fsynced; the names once, here
            fsync_folder(run.out_dir)
    result.seconds = time.perf_counter() - started
    progress.close(result)
    return result


def _attempt(
    item: BatchItem, run: BatchRun, warnings: list[str], same_name: list[str] | None
) -> KeyOutcome:
    """One key's outcome: wrapped, or refused with the reason (``interrupted`` when an interrupt
    came while it was wrapped; ``internal`` for an unexpected error)."""
    try:
        return _wrap_item(item, run, warnings, same_name)
    except ByokError as exc:
        return _refused(item, exc.reason, exc.message)
    except KeyboardInterrupt:
        return _refused(
            item, "interrupted", "interrupted while this key was wrapped: nothing of it written"
        )
    except Exception as exc:  # noqa: BLE001  # one key's bug must not stop the batch; the type only (never its text, which may quote input)
        return _refused(item, "internal", f"unexpected {type(exc).__name__}: nothing written")


def _refused(item: BatchItem, reason: str, message: str) -> KeyOutcome:
    return KeyOutcome(item.name, item.source, REFUSED, reason, message.replace("\n", " "))


def _duplicate_names(items: Sequence[BatchItem]) -> dict[str, list[str]]:
    """Key names (case-folded) that more than one entry gives, with those entries' sources."""
    counts = Counter(i.name.casefold() for i in items if is_key_name(i.name))
    sources: dict[str, list[str]] = {}
    for item in items:
        if counts[item.name.casefold()] > 1:
            sources.setdefault(item.name.casefold(), []).append(item.source)
    return sources


def _wrap_item(
    item: BatchItem, run: BatchRun, warnings: list[str], same_name: list[str] | None
) -> KeyOutcome:
    """Wrap one key and write its package and manifest, as ``wrap`` does. ``same_name``: the
    sources of all the entries with this key's name, when there are several.

    Raises:
        ByokError: any reason ``wrap`` refuses a key with, and ``bad_key_name``,
            ``duplicate_key_name``, ``bad_batch_row``, ``target_type_mismatch``.
    """
    if item.refusal is not None:
        raise item.refusal
    if not is_key_name(item.name):
        raise ByokError(
            f"{item.name!r} is not a key name (1-127 of 0-9 a-z A-Z -)", reason="bad_key_name"
        )
    if same_name:
        raise ByokError(
            f"{len(same_name)} entries name key {item.name!r} ({', '.join(same_name)}): none "
            "of them is wrapped",
            reason="duplicate_key_name",
        )
    outputs = Outputs(
        item.name, run.out_dir / f"{item.name}.byok", run.out_dir / f"{item.name}.manifest.json"
    )
    check_writable([outputs.package, outputs.manifest], force=run.force)
    wrapped = _wrap_source(item, run, warnings)
    built = write_package(
        run.ctx, outputs, wrapped, created=run.clock(), force=run.force, sync_folder=False
    )
    return KeyOutcome(item.name, item.source, WRAPPED, facts=package_facts(outputs, wrapped, built))


def _wrap_source(item: BatchItem, run: BatchRun, warnings: list[str]) -> Wrapped:
    """The item's key, wrapped: read from its file, generated, or wrapped in the token.

    Raises:
        ByokError: the reasons of ``wrap --key``, ``--generate`` and HSM mode;
            ``target_type_mismatch``.
    """
    kek = run.ctx.kek
    if item.pkcs11_label is not None:
        if run.token is None:
            raise ByokError("no token session for a PKCS#11 label", reason="internal")
        result = run.token.wrap(item.pkcs11_label, kek=kek)
        _check_type(result.target.type, item.expected_type)
        warnings.extend(result.warnings)
        key_ops = resolve_key_ops(result.target.type, item.key_ops)
        return Wrapped(result.ciphertext, result.target, key_ops, dict(result.key_source))
    if item.generate is not None:
        key = generate_target(item.generate)
        return wrap_software(
            kek, key, key_ops=item.key_ops, key_source={"kind": "software-generated"}
        )
    if item.key_file is None:
        raise ByokError("the entry names no key", reason="bad_batch_row")
    key = load_target(
        read_file(str(item.key_file), "key file"),
        key_type="oct" if item.raw_aes else None,
        passphrase=run.passphrase,
    )
    with key.plaintext:
        _check_type(key.type, item.expected_type)
        return wrap_software(kek, key, key_ops=item.key_ops, key_source={"kind": "software-file"})


def _check_type(actual: TargetType, expected: str | None) -> None:
    """Raises ByokError ``target_type_mismatch`` when the key is not of the stated type."""
    if expected is not None and actual.name != expected:
        raise ByokError(
            f"the key is {actual.name}; the key list says {expected}",
            reason="target_type_mismatch",
        )


def summary(
    result: BatchResult, ctx: KekContext, out_dir: Path, ignored: Sequence[str]
) -> dict[str, Any]:
    """The batch's summary document (``wrap-batch --json``); its shape is stable:
    ``offline_packager/schemas/batch-summary.schema.json``."""
    wrapped, refused = result.count(WRAPPED), result.count(REFUSED)
    status = "ok" if refused == 0 else "refused"
    if result.interrupted:
        status = "interrupted"
    return {
        "summary_version": SUMMARY_VERSION,
        "status": status,
        "out_dir": str(out_dir),
        "kek_kid": ctx.kid.kid,
        "kek_spki_sha256": ctx.kek.fingerprint,
        "kek_attestation": dict(ctx.attestation) if ctx.attestation else None,
        "totals": {
            "keys": result.planned,
            "wrapped": wrapped,
            "refused": refused,
            "not_attempted": result.planned - len(result.outcomes),
        },
        "seconds": round(result.seconds, 3),
        "keys": [o.as_dict() for o in result.outcomes],
        "ignored_files": list(ignored),
    }
