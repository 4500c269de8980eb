"""Pipeline throughput and overhead against Azurite and the emulator, plus the Function's cold start.

Not a test: it prints figures. In one run, on one emulator and one Azurite (both started here on
free loopback ports and stopped at the end, also on Ctrl-C or an error):

* packages per second through the pipeline (``byok_pipeline.processing.processor.process_blob``, the function
  the blob trigger calls) with 1, 2 and 4 worker threads, each run on its own containers;
* the pipeline's time per package (1 worker) against a bare loop of ``KeyClient.import_key`` on
  the same kind of packages: the ratio is what validation, exactly-once bookkeeping, verification,
  status documents, audit events and disposal cost on top of the import itself;
* the cold start of ``import function_app`` and of ``import byok_pipeline.processing.runtime`` in a fresh
  interpreter (median of several runs).

Packages (oct-256 and ec-p256 targets by default, so key generation stays cheap) are made with the
offline packager and dropped into the incoming container before the clock starts: the timed part
is the pipeline's own work. Every package must end ``imported``; a warning line says otherwise.

Run: ``.venv/bin/python benchmarks/pipeline_bench.py [--packages N] [--type T ...] [--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from azure.keyvault.keys import JsonWebKey, KeyClient
from azure.storage.blob import BlobServiceClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from byok_pipeline.core.errors import InProgress, TransientError
from byok_pipeline.core.metadata import options_from_manifest
from byok_pipeline.localdev.azurite import Azurite
from byok_pipeline.localdev.stack import emulator_deps
from byok_pipeline.processing.processor import Deps, process_blob
from managed_hsm_emulator.testing import EmulatorHandle, running_emulator
from offline_packager.kek import Kek, load_kek_pem
from offline_packager.keytypes import TYPE_NAMES, TargetType
from offline_packager.kid import KeyId, parse_kid
from offline_packager.packager import build_package
from offline_packager.target_keys import generate_target
from offline_packager.wrap import wrap_target

REPO = Path(__file__).resolve().parent.parent
WORKER_COUNTS = (1, 2, 4)
DEFAULT_TYPES = ("oct-256", "ec-p256")
KEK_NAME = "bench-kek"
REDELIVERY_DEADLINE = 60.0  # seconds a package may keep failing transiently before we give up


@dataclass(frozen=True)
class Package:
    """One package made by the offline packager, with the blob metadata ``byok upload`` writes."""

    blob_name: str
    data: bytes
    metadata: dict[str, str]
    target_type: TargetType

    @property
    def key_name(self) -> str:
        return self.blob_name.removesuffix(".byok")


@dataclass
class Run:
    """One timed series: packages, wall time and per-package latencies."""

    label: str
    workers: int
    packages: int
    seconds: float
    packages_per_second: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    states: dict[str, int] = field(default_factory=dict)
    redeliveries: int = 0
    trail: dict[str, float] = field(default_factory=dict)  # audit trail requests per package


@dataclass(frozen=True)
class ColdStart:
    """Median over ``runs`` fresh interpreters: the import alone, and the whole process."""

    target: str
    runs: int
    import_ms: float | None
    process_ms: float


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def make_run(label: str, workers: int, seconds: float, laps: list[float]) -> Run:
    laps = sorted(laps)
    return Run(
        label=label,
        workers=workers,
        packages=len(laps),
        seconds=seconds,
        packages_per_second=len(laps) / seconds if seconds > 0 else 0.0,
        mean_ms=statistics.fmean(laps) * 1000 if laps else 0.0,
        p50_ms=statistics.median(laps) * 1000 if laps else 0.0,
        p95_ms=_percentile(laps, 0.95) * 1000 if laps else 0.0,
    )


# --- the stack ------------------------------------------------------------------------------


def kek_of(client: KeyClient) -> tuple[Kek, KeyId]:
    """The KEK's public key and versioned kid, as ``byok kek download`` hands them over."""
    key = client.get_key(KEK_NAME)
    n = int.from_bytes(getattr(key.key, "n"), "big")  # noqa: B009  # dynamic JWK fields
    e = int.from_bytes(getattr(key.key, "e"), "big")  # noqa: B009  # same
    pem = (
        rsa.RSAPublicNumbers(e, n)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return load_kek_pem(pem), parse_kid(str(key.id))


def production_trail(deps: Deps, hsm: EmulatorHandle, signing_kid: str, connection: str) -> Any:
    """The audit sink as the Function wires it (``wiring.audit_sink``): this worker's own
    signed chain in the audit container, signed inside the HSM, then telemetry."""
    from byok_pipeline.processing.wiring import audit_sink

    os.environ["BYOK_STORAGE"] = connection
    settings = replace(deps.settings, audit_signing_kid=signing_kid)
    return audit_sink(settings, credential=hsm.credential(), ca_bundle=str(hsm.ca))


def build_deps(hsm: EmulatorHandle, service: BlobServiceClient, prefix: str) -> Deps:
    """The pipeline wired as the tests wire it (byok_pipeline.localdev.stack.emulator_deps)."""
    deps: Deps = emulator_deps(hsm, service, prefix)
    return deps


def make_packages(
    kek: Kek, kid: KeyId, types: tuple[str, ...], prefix: str, count: int
) -> list[Package]:
    """``count`` packages cycling through ``types``, each for its own key name."""
    packages: list[Package] = []
    for i, type_name in zip(range(count), itertools.cycle(types), strict=False):
        target = generate_target(type_name)
        blob_name = f"{prefix}-{type_name}-{i}.byok"
        with target.plaintext:
            ciphertext = wrap_target(kek.public_key, target.plaintext)
        built = build_package(
            kek=kek,
            kek_kid=kid,
            ciphertext=ciphertext,
            target=target.public,
            key_ops=target.type.default_key_ops,
            key_source={"kind": "software-generated"},
            package_name=blob_name,
            created=datetime.now(UTC),
        )
        metadata = options_from_manifest(built.manifest).to_metadata()
        packages.append(Package(blob_name, built.package_bytes, metadata, target.type))
    return packages


# --- the timed parts ------------------------------------------------------------------------


def deliver(name: str, deps: Deps, *, deadline: float | None = None) -> tuple[str, int]:
    """Deliver like the platform: a handed-back package (InProgress, TransientError) comes
    again after the wait it asked for (a throttled one's, at most 1 s), else after 0.2 s, until
    ``deadline`` (monotonic; default REDELIVERY_DEADLINE from now). (state, redeliveries)."""
    if deadline is None:
        deadline = time.monotonic() + REDELIVERY_DEADLINE
    redeliveries = 0
    while True:
        try:
            return process_blob(name, deps).state, redeliveries
        except (InProgress, TransientError) as exc:
            if time.monotonic() > deadline:
                return "transient-exhausted", redeliveries
            redeliveries += 1
            wait = getattr(exc, "retry_after", None)
            time.sleep(min(1.0, wait) if wait is not None else 0.2)


def run_pipeline(
    deps: Deps,
    packages: list[Package],
    warmup: Package,
    workers: int,
    *,
    trails: list[Any] | None = None,
) -> Run:
    """Drop every package, then deliver them all through ``workers`` threads. With ``trails``
    (one production audit sink per worker, as each Function instance has its own), worker i
    audits through ``trails[i]``."""
    for pkg in [warmup, *packages]:
        deps.store.upload_incoming(pkg.blob_name, pkg.data, pkg.metadata)
    per_worker = [replace(deps, audit=sink) for sink in trails] if trails else [deps] * workers
    slot = threading.local()
    slots = iter(range(workers))
    slots_lock = threading.Lock()

    def my_deps() -> Deps:
        if not hasattr(slot, "index"):
            with slots_lock:
                slot.index = next(slots)
        index: int = slot.index
        return per_worker[index]

    warm_state, _ = deliver(warmup.blob_name, per_worker[0])  # clients, TLS, auth: untimed
    if warm_state != "imported":
        print(f"WARNING: warm-up package ended {warm_state}", file=sys.stderr)
    before = [_trail_stats(d) for d in per_worker]

    def one(pkg: Package) -> tuple[float, str, int]:
        t0 = time.perf_counter()
        try:
            state, redeliveries = deliver(pkg.blob_name, my_deps())
        except Exception as exc:  # noqa: BLE001  # counted as a state and reported, never hidden
            state, redeliveries = f"error: {type(exc).__name__}", 0
        return time.perf_counter() - t0, state, redeliveries

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"bench-w{workers}")
    try:
        started = time.perf_counter()
        results = list(pool.map(one, packages))
        elapsed = time.perf_counter() - started
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    label = f"pipeline{' + trail' if trails else ''}, {workers} worker{'s' if workers > 1 else ''}"
    run = make_run(label, workers, elapsed, [lap for lap, _, _ in results])
    run.states = dict(Counter(state for _, state, _ in results))
    run.redeliveries = sum(r for _, _, r in results)
    if trails:
        after = [_trail_stats(d) for d in per_worker]
        for name in ("appends", "requests", "conflicts", "settled", "foreign"):
            total = sum(a[name] - b[name] for a, b in zip(after, before, strict=True))
            run.trail[f"{name}_per_package"] = total / len(packages)
    leftover = list(deps.store.service.get_container_client(
        deps.settings.incoming_container).list_blobs())  # fmt: skip
    if leftover:
        run.states["left-in-incoming"] = len(leftover)
    return run


def _trail_stats(deps: Deps) -> dict[str, int]:
    """The production trail writer's counters behind ``deps.audit`` (zeros without one)."""
    stats = getattr(getattr(getattr(deps.audit, "trail", None), "stats", None), "__dict__", {})
    return {k: int(v) for k, v in stats.items()}


def run_import_loop(client: KeyClient, packages: list[Package], warmup: Package) -> Run:
    """The floor: a bare loop of ``import_key`` on the same kind of packages."""

    def import_one(pkg: Package) -> str:
        t = pkg.target_type
        jwk = JsonWebKey(kty=t.kty, crv=t.crv, key_ops=list(t.default_key_ops), t=pkg.data)
        try:
            client.import_key(pkg.key_name, jwk, hardware_protected=True)
        except Exception as exc:  # noqa: BLE001  # counted as a state and reported, never hidden
            return f"error: {type(exc).__name__}"
        return "imported"

    import_one(warmup)
    laps: list[float] = []
    states: Counter[str] = Counter()
    started = time.perf_counter()
    for pkg in packages:
        t0 = time.perf_counter()
        states[import_one(pkg)] += 1
        laps.append(time.perf_counter() - t0)
    run = make_run("bare import_key loop", 1, time.perf_counter() - started, laps)
    run.states = dict(states)
    return run


_COLD_CODE = "import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"


def cold_start(module: str | None, runs: int) -> ColdStart:
    """Median over ``runs`` fresh interpreters (``module=None``: the bare interpreter)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    code = _COLD_CODE.format(module=module) if module else "pass"
    imports: list[float] = []
    walls: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        walls.append(time.perf_counter() - t0)
        if module:
            imports.append(float(done.stdout.strip()))
    return ColdStart(
        target=f"import {module}" if module else "python -c pass",
        runs=runs,
        import_ms=statistics.median(imports) * 1000 if imports else None,
        process_ms=statistics.median(walls) * 1000,
    )


# --- orchestration --------------------------------------------------------------------------


@contextlib.contextmanager
def local_stack() -> Iterator[tuple[Azurite, EmulatorHandle]]:
    """Azurite and the emulator in a temporary directory; both stopped, the directory removed."""
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pipeline-bench-")))
        azurite = stack.enter_context(Azurite.start(tmp / "azurite"))
        hsm = stack.enter_context(running_emulator(tmp / "hsm"))
        yield azurite, hsm


def bench(types: tuple[str, ...], count: int, cold_runs: int, *, quiet: bool) -> dict[str, Any]:
    def note(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    note("starting Azurite and the emulator ...")
    with local_stack() as (azurite, hsm):
        admin = hsm.key_client()
        admin.create_rsa_key(
            KEK_NAME, size=3072, key_operations=["import"], hardware_protected=True
        )
        kek, kid = kek_of(admin)
        service = BlobServiceClient.from_connection_string(azurite.connection_string)
        try:
            note(f"packaging {count * (len(WORKER_COUNTS) + 1)} packages ...")
            series = {
                prefix: make_packages(kek, kid, types, prefix, count + 1)
                for prefix in (
                    "loop",
                    *(f"w{w}" for w in WORKER_COUNTS),
                    *(f"t{w}" for w in WORKER_COUNTS),
                )
            }
            note("bare import_key loop ...")
            loop_client = hsm.key_client()
            runs = [run_import_loop(loop_client, series["loop"][1:], series["loop"][0])]
            for w in WORKER_COUNTS:
                note(f"pipeline with {w} worker(s) ...")
                pkgs = series[f"w{w}"]
                deps = build_deps(hsm, service, f"bench{w}")
                runs.append(run_pipeline(deps, pkgs[1:], pkgs[0], w))
            signing_kid = str(
                admin.create_ec_key(
                    "bench-audit-signer", curve="P-256", key_operations=["sign", "verify"],
                    hardware_protected=True,
                ).id
            )  # fmt: skip
            for w in WORKER_COUNTS:
                note(f"pipeline with the signed audit trail, {w} worker(s) ...")
                pkgs = series[f"t{w}"]
                deps = build_deps(hsm, service, f"trail{w}")
                trails = [
                    production_trail(deps, hsm, signing_kid, azurite.connection_string)
                    for _ in range(w)
                ]
                runs.append(run_pipeline(deps, pkgs[1:], pkgs[0], w, trails=trails))
        finally:
            service.close()
        endpoints = {"azurite": azurite.blob_url, "emulator": hsm.url}
    note("cold starts ...")
    colds = [
        cold_start(None, cold_runs),
        cold_start("function_app", cold_runs),
        cold_start("byok_pipeline.processing.runtime", cold_runs),
    ]
    loop, one_worker = runs[0], runs[1]
    trail_runs = [r for r in runs if r.trail]
    return {
        "endpoints": endpoints,
        "kek": "rsa-3072",
        "types": list(types),
        "packages_per_run": count,
        "runs": [asdict(r) for r in runs],
        "overhead": {
            "pipeline_ms_per_package": 1000 * one_worker.seconds / one_worker.packages,
            "import_key_ms_per_package": 1000 * loop.seconds / loop.packages,
            "ratio": one_worker.seconds / loop.seconds * loop.packages / one_worker.packages,
            "p50_ratio": one_worker.p50_ms / loop.p50_ms,
        },
        "scaling": {
            str(r.workers): r.packages_per_second / one_worker.packages_per_second
            for r in runs[1:]
            if not r.trail
        },
        "trail_scaling": {
            str(r.workers): r.packages_per_second / trail_runs[0].packages_per_second
            for r in trail_runs
        },
        "cold_start": [asdict(c) for c in colds],
        "problems": problems(runs),
    }


def problems(runs: list[Run]) -> list[str]:
    """One line per run where some package did not end ``imported``."""
    lines = []
    for r in runs:
        bad = {s: n for s, n in r.states.items() if s != "imported"}
        if bad or r.states.get("imported", 0) != r.packages:
            detail = ", ".join(f"{n} {s}" for s, n in sorted(bad.items()))
            lines.append(
                f"{r.label}: {r.states.get('imported', 0)}/{r.packages} imported; {detail}"
            )
    return lines


def print_report(report: dict[str, Any]) -> None:
    ends = report["endpoints"]
    print(f"pipeline benchmark: Azurite {ends['azurite']}, emulator {ends['emulator']}, "
          f"KEK {report['kek']}")  # fmt: skip
    print(f"targets {', '.join(report['types'])} (alternating), {report['packages_per_run']} "
          "packages per run, packaged and dropped before the clock starts")  # fmt: skip
    print()
    print(f"{'run':<24} {'pkgs':>5} {'seconds':>8} {'pkg/s':>7} {'mean ms':>8} "
          f"{'p50 ms':>8} {'p95 ms':>8} {'redeliv':>7}")  # fmt: skip
    for r in report["runs"]:
        print(f"{r['label']:<24} {r['packages']:>5} {r['seconds']:>8.2f} "
              f"{r['packages_per_second']:>7.1f} {r['mean_ms']:>8.1f} {r['p50_ms']:>8.1f} "
              f"{r['p95_ms']:>8.1f} {r['redeliveries']:>7}")  # fmt: skip
    o = report["overhead"]
    print()
    print(f"overhead: pipeline (1 worker) {o['pipeline_ms_per_package']:.1f} ms/package vs bare "
          f"import_key {o['import_key_ms_per_package']:.1f} ms/package = {o['ratio']:.1f}x "
          f"(p50 {o['p50_ratio']:.1f}x)")  # fmt: skip
    scaling = ", ".join(f"{w} workers {x:.2f}x" for w, x in report["scaling"].items() if w != "1")
    print(f"scaling vs 1 worker: {scaling} ({os.cpu_count()} CPUs, shared with both services)")
    trail_scaling = ", ".join(
        f"{w} workers {x:.2f}x" for w, x in report["trail_scaling"].items() if w != "1"
    )
    print(f"with the signed audit trail, scaling vs 1 worker: {trail_scaling}")
    for r in report["runs"]:
        if r["trail"]:
            tr = r["trail"]
            print(
                f"  {r['label']}: audit appends {tr['appends_per_package']:.2f}/package, storage "
                f"requests {tr['requests_per_package']:.2f}/package, 412 conflicts "
                f"{tr['conflicts_per_package']:.2f}/package, settled {tr['settled_per_package']:.2f}"
                f", foreign {tr['foreign_per_package']:.2f}"
            )
    print()
    runs = report["cold_start"][0]["runs"]
    print(f"cold start, fresh interpreter, median of {runs}:")
    for c in report["cold_start"]:
        imp = f"import {c['import_ms']:7.1f} ms   " if c["import_ms"] is not None else " " * 20
        print(f"  {c['target']:<30} {imp}whole process {c['process_ms']:7.1f} ms")
    print()
    if report["problems"]:
        for line in report["problems"]:
            print(f"WARNING: {line}")
    else:
        total = sum(r["packages"] for r in report["runs"])
        print(f"all {total} packages ended imported")


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds the context managers: services stopped


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--packages", type=int, default=400, help="packages per run (default 400; 7 runs)"
    )
    parser.add_argument(
        "--type",
        dest="types",
        action="append",
        choices=TYPE_NAMES,
        metavar="TYPE",
        help=f"target type, repeatable (default: {' '.join(DEFAULT_TYPES)}); one of "
        + ", ".join(TYPE_NAMES),
    )
    parser.add_argument(
        "--cold-runs", type=int, default=7, help="fresh interpreters per cold-start figure"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.packages < 1 or args.cold_runs < 1:
        parser.error("--packages and --cold-runs must be at least 1")
    types: tuple[str, ...] = tuple(dict.fromkeys(args.types or DEFAULT_TYPES))
    signal.signal(signal.SIGTERM, _terminate)
    try:
        report = bench(types, args.packages, args.cold_runs, quiet=args.json)
    except KeyboardInterrupt:
        print("interrupted: Azurite and the emulator were stopped", file=sys.stderr)
        raise SystemExit(130) from None
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
