"""Packager throughput: ``--key`` wrapping of RSA-3072 and AES-256 targets, ours vs the OpenSSL CLI.

Not a test: it prints packages per second, measured as a user pays for them:

* ``byok-package`` as a subprocess (``python -m offline_packager wrap --key ...``, interpreter
  start-up included), and in-process (``offline_packager.cli.main([...])``);
* the OpenSSL CLI recipe as subprocesses: ``openssl rand`` (a fresh AES-256 key), ``openssl
  pkeyutl -encrypt`` (RSA-OAEP SHA-1/MGF1-SHA-1 under the KEK public key), ``openssl enc
  -id-aes256-wrap-pad -iv A65959A6`` (AES-KWP over the PKCS#8 DER or raw key), then the package
  JSON assembled in Python (the cheapest possible assembly step, which favours the recipe).

Both start from the same key file (PKCS#8 DER for RSA, 32 raw bytes for AES). Our CLI also writes
a manifest and checks the KEK fingerprint: that extra work is part of what is measured. The ratio
is our packages per second divided by the recipe's (above 1: ours is faster). Every KEK, key and
package lives in a temporary directory removed at the end.

Batch mode (``wrap-batch``, one process for many keys) against the same recipe, per package:
200 EC P-256 and 200 AES-256 key files (PKCS#8 DER, raw bytes), each type alone and both in one
batch, the same 200 + 200 generated in memory (``--generate``), and RSA-2048 key files. A batch
is timed as a user pays for it: one ``python -m offline_packager wrap-batch`` process, start-up
included, divided by its packages; the recipe's figure is its mean per package over the same key
files (the target: the batch at least 5x faster). Every batch package is unwrapped with the KEK
private key outside the timing. Start-up: ``python -m offline_packager --version`` against a bare
``python -c pass``.

Run: ``.venv/bin/python benchmarks/packager_bench.py [--iterations N] [--batch-keys N]
[--rsa-keys N] [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from offline_packager import cli, cli_exit
from offline_packager.kek import load_kek_pem
from offline_packager.package_format import b64url_encode, parse_package
from offline_packager.wrap import unwrap_target

REPO = Path(__file__).resolve().parent.parent
KEK_KID = "https://bench.managedhsm.azure.net/keys/bench-kek/0123456789abcdef0123456789abcdef"
TYPES = ("rsa-3072", "oct-256")
METHODS = ("cli-subprocess", "cli-in-process", "openssl-recipe")


@dataclass(frozen=True)
class Result:
    """One (target type, method) series."""

    target_type: str
    method: str
    packages: int
    seconds: float
    packages_per_second: float
    median_ms: float
    p95_ms: float


@dataclass(frozen=True)
class Workspace:
    """The KEK and target key files of one run, all under ``root``."""

    root: Path
    kek_public: Path
    kek_private: rsa.RSAPrivateKey
    kek_sha256: str
    targets: dict[str, tuple[Path, bytes, list[str]]]  # type → (file, plaintext, extra CLI args)


def make_workspace(root: Path) -> Workspace:
    """A fresh RSA-3072 KEK and one target key file per type (the key a custodian holds)."""
    kek_private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    kek_pem = kek_private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    kek_public = root / "kek.pem"
    kek_public.write_bytes(kek_pem)
    target_rsa = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    rsa_der = target_rsa.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    aes_raw = os.urandom(32)
    (root / "rsa-3072.der").write_bytes(rsa_der)
    (root / "oct-256.bin").write_bytes(aes_raw)
    for sub in METHODS:
        (root / sub).mkdir()
    return Workspace(
        root=root,
        kek_public=kek_public,
        kek_private=kek_private,
        kek_sha256=load_kek_pem(kek_pem).fingerprint,
        targets={
            "rsa-3072": (root / "rsa-3072.der", rsa_der, []),
            "oct-256": (root / "oct-256.bin", aes_raw, ["--key-type", "oct"]),
        },
    )


def wrap_args(ws: Workspace, type_name: str, out: Path) -> list[str]:
    key_file, _, extra = ws.targets[type_name]
    return ["wrap", "--kek", str(ws.kek_public), "--kek-kid", KEK_KID,
            "--kek-sha256", ws.kek_sha256, "--key", str(key_file), *extra,
            "--out", str(out)]  # fmt: skip


def run_cli_subprocess(ws: Workspace, type_name: str, out: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    subprocess.run(
        [sys.executable, "-m", "offline_packager", *wrap_args(ws, type_name, out)],
        check=True,
        capture_output=True,
        env=env,
    )


def run_cli_in_process(ws: Workspace, type_name: str, out: Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(wrap_args(ws, type_name, out))
    if code != cli_exit.EXIT_OK:
        raise RuntimeError(f"byok-package wrap exited {code} for {type_name}")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def run_openssl_recipe(ws: Workspace, type_name: str, out: Path) -> None:
    """The documented OpenSSL recipe, one subprocess per step, then the JSON."""
    openssl_recipe(ws, ws.targets[type_name][0], out)


def openssl_recipe(ws: Workspace, key_file: Path, out: Path) -> None:
    """The recipe for one key file (PKCS#8 DER of an RSA or EC key, or raw AES bytes)."""
    work = out.parent
    aes, rsa_part, kwp_part = work / "aes.bin", work / "rsa.bin", work / "kwp.bin"
    _openssl("rand", "-out", str(aes), "32")
    _openssl("pkeyutl", "-encrypt", "-pubin", "-inkey", str(ws.kek_public),
             "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha1",
             "-pkeyopt", "rsa_mgf1_md:sha1", "-in", str(aes), "-out", str(rsa_part))  # fmt: skip
    _openssl("enc", "-id-aes256-wrap-pad", "-iv", "A65959A6", "-K", aes.read_bytes().hex(),
             "-in", str(key_file), "-out", str(kwp_part))  # fmt: skip
    ciphertext = rsa_part.read_bytes() + kwp_part.read_bytes()
    doc = {
        "schema_version": "1.0.0",
        "header": {"kid": KEK_KID, "alg": "dir", "enc": "CKM_RSA_AES_KEY_WRAP"},
        "ciphertext": b64url_encode(ciphertext),
        "generator": "openssl recipe",
    }
    out.write_text(json.dumps(doc, separators=(",", ":")), encoding="utf-8")
    for part in (aes, rsa_part, kwp_part):
        part.unlink()


RUNNERS: dict[str, Callable[[Workspace, str, Path], None]] = {
    "cli-subprocess": run_cli_subprocess,
    "cli-in-process": run_cli_in_process,
    "openssl-recipe": run_openssl_recipe,
}


def check_package(ws: Workspace, type_name: str, path: Path) -> None:
    """Outside the timing: the package unwraps, with the KEK private key, to the target."""
    package = parse_package(path.read_bytes())
    with unwrap_target(ws.kek_private, package.ciphertext) as plain:
        if plain.reveal() != ws.targets[type_name][1]:
            raise RuntimeError(f"{path.name} does not unwrap to the {type_name} target")


def measure(ws: Workspace, type_name: str, method: str, iterations: int) -> Result:
    runner = RUNNERS[method]
    folder = ws.root / method
    warmup = folder / f"warmup-{type_name}.byok"
    runner(ws, type_name, warmup)  # page cache, imports, lazy initialisation: outside the timing
    check_package(ws, type_name, warmup)
    laps: list[float] = []
    started = time.perf_counter()
    for i in range(iterations):
        t0 = time.perf_counter()
        runner(ws, type_name, folder / f"{type_name}-{i}.byok")
        laps.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    check_package(ws, type_name, folder / f"{type_name}-{iterations - 1}.byok")
    laps.sort()
    return Result(
        target_type=type_name,
        method=method,
        packages=iterations,
        seconds=elapsed,
        packages_per_second=iterations / elapsed,
        median_ms=statistics.median(laps) * 1000,
        p95_ms=laps[min(len(laps) - 1, round(0.95 * (len(laps) - 1)))] * 1000,
    )


def ratios(results: list[Result]) -> dict[str, dict[str, float]]:
    """Per type: our packages/s divided by the OpenSSL recipe's."""
    rate = {(r.target_type, r.method): r.packages_per_second for r in results}
    return {
        t: {
            f"{m}_vs_openssl": rate[t, m] / rate[t, "openssl-recipe"]
            for m in ("cli-subprocess", "cli-in-process")
        }
        for t in TYPES
    }


def openssl_version() -> str:
    done = subprocess.run(["openssl", "version"], check=True, capture_output=True, text=True)
    return done.stdout.strip()


def print_table(results: list[Result], rel: dict[str, dict[str, float]], iterations: int) -> None:
    print(f"packager --key wrapping, {iterations} packages per row, KEK RSA-3072")
    print(f"python {sys.version.split()[0]}, {openssl_version()}")
    print()
    print(f"{'target':<10} {'method':<16} {'pkgs':>5} {'seconds':>8} {'pkg/s':>8} "
          f"{'p50 ms':>8} {'p95 ms':>8}")  # fmt: skip
    for r in results:
        print(f"{r.target_type:<10} {r.method:<16} {r.packages:>5} {r.seconds:>8.2f} "
              f"{r.packages_per_second:>8.1f} {r.median_ms:>8.1f} {r.p95_ms:>8.1f}")  # fmt: skip
    print()
    print("ratio = our packages/s / OpenSSL recipe packages/s (above 1: ours is faster)")
    for t, values in rel.items():
        print(f"{t:<10} subprocess {values['cli-subprocess_vs_openssl']:6.2f}x   "
              f"in-process {values['cli-in-process_vs_openssl']:6.2f}x")  # fmt: skip


# --- batch mode: wrap-batch against the recipe, per package ----------------------------------


@dataclass(frozen=True)
class BatchFigure:
    """One ``wrap-batch`` run and the recipe over the same kind of key, per package."""

    label: str
    packages: int
    seconds: float
    batch_ms_per_package: float
    recipe_packages: int
    recipe_ms_per_package: float
    ratio: float  # recipe ms per package / batch ms per package (above 1: the batch is faster)


def write_key_files(folder: Path, type_name: str, count: int) -> list[Path]:
    """``count`` key files of one type, as a custodian holds them: PKCS#8 DER, raw AES bytes."""
    folder.mkdir()
    files: list[Path] = []
    for i in range(1, count + 1):
        if type_name == "oct-256":
            path = folder / f"{type_name}-{i:04d}.bin"
            path.write_bytes(os.urandom(32))
        else:
            key = (
                ec.generate_private_key(ec.SECP256R1())
                if type_name == "ec-p256"
                else rsa.generate_private_key(public_exponent=65537, key_size=2048)
            )
            path = folder / f"{type_name}-{i:04d}.der"
            path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.DER,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        files.append(path)
    return files


def run_wrap_batch(ws: Workspace, out: Path, *sources: str) -> float:
    """One ``wrap-batch`` process (interpreter start-up included); its wall-clock seconds."""
    out.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-m", "offline_packager", "wrap-batch", "--kek", str(ws.kek_public),
            "--kek-kid", KEK_KID, "--kek-sha256", ws.kek_sha256, *sources, "--out-dir", str(out)]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    return time.perf_counter() - started


def check_batch(ws: Workspace, out: Path, key_files: list[Path], generated: int) -> None:
    """Outside the timing: one package and one manifest per key in ``out``; every package
    unwraps, a key file's to the file's bytes."""
    packages = sorted(out.glob("*.byok"))
    if len(packages) != len(key_files) + generated or len(list(out.iterdir())) != 2 * len(packages):
        raise RuntimeError(f"{out} does not hold one package and one manifest per key")
    expected = {f"{f.stem}.byok": f.read_bytes() for f in key_files}
    for path in packages:
        package = parse_package(path.read_bytes())
        with unwrap_target(ws.kek_private, package.ciphertext) as plain:
            if path.name in expected and plain.reveal() != expected[path.name]:
                raise RuntimeError(f"{path.name} does not unwrap to its key file")


def recipe_ms_per_package(ws: Workspace, key_files: list[Path], out: Path) -> float:
    """The recipe's mean milliseconds per package over ``key_files``."""
    out.mkdir()
    openssl_recipe(ws, key_files[0], out / "warmup.byok")
    started = time.perf_counter()
    for key_file in key_files:
        openssl_recipe(ws, key_file, out / f"{key_file.stem}.byok")
    return (time.perf_counter() - started) * 1000 / len(key_files)


def measure_batches(ws: Workspace, keys: int, rsa_keys: int, recipe_keys: int) -> list[BatchFigure]:
    """The batch rows: EC P-256 and AES-256 files alone and together, the same generated, and
    RSA-2048 files; each against the recipe on (up to ``recipe_keys`` of) the same kind of
    files (two types: the mean of both)."""
    root = ws.root / "batch"
    root.mkdir()
    files = {t: write_key_files(root / f"keys-{t}", t, n) for t, n in
             (("ec-p256", keys), ("oct-256", keys), ("rsa-2048", rsa_keys))}  # fmt: skip
    recipe = {t: recipe_ms_per_package(ws, f[:recipe_keys], root / f"recipe-{t}")
              for t, f in files.items()}  # fmt: skip
    generate = ["--generate", f"ec-p256:{keys}", "--generate", f"oct-256:{keys}"]
    runs: list[tuple[str, tuple[str, ...], bool]] = [  # label, types, generated
        ("ec-p256 files", ("ec-p256",), False),
        ("oct-256 files", ("oct-256",), False),
        ("ec-p256 + oct-256 files", ("ec-p256", "oct-256"), False),
        ("ec-p256 + oct-256 generated", ("ec-p256", "oct-256"), True),
        ("rsa-2048 files", ("rsa-2048",), False),
    ]
    figures: list[BatchFigure] = []
    for i, (label, types, generated) in enumerate(runs):
        key_files = [] if generated else [f for t in types for f in files[t]]
        folders = (
            [] if generated else [a for t in types for a in ("--keys", str(root / f"keys-{t}"))]
        )
        out = root / f"out-{i}"
        seconds = run_wrap_batch(ws, out, *(generate if generated else folders))
        packages = 2 * keys if generated else len(key_files)
        check_batch(ws, out, key_files, packages - len(key_files))
        batch_ms = seconds * 1000 / packages
        recipe_ms = statistics.mean(recipe[t] for t in types)
        recipe_n = sum(min(recipe_keys, len(files[t])) for t in types)
        figures.append(BatchFigure(label, packages, seconds, batch_ms, recipe_n, recipe_ms,
                                   recipe_ms / batch_ms))  # fmt: skip
    return figures


def startup_ms(repeats: int) -> dict[str, float]:
    """Median wall-clock milliseconds of ``python -m offline_packager --version`` and of a bare
    ``python -c pass``: what every single ``wrap`` pays before its work."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)

    def median_ms(argv: list[str]) -> float:
        laps: list[float] = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True, env=env)
            laps.append((time.perf_counter() - t0) * 1000)
        return statistics.median(laps)

    return {
        "byok_package_version_ms": median_ms(
            [sys.executable, "-m", "offline_packager", "--version"]
        ),
        "bare_python_ms": median_ms([sys.executable, "-c", "pass"]),
    }


def print_batches(figures: list[BatchFigure], startup: dict[str, float]) -> None:
    print()
    print("wrap-batch (one process, start-up included) vs the OpenSSL recipe, per package")
    print(f"{'keys':<28} {'pkgs':>5} {'seconds':>8} {'batch ms':>9} {'recipe ms':>10} "
          f"{'ratio':>7}")  # fmt: skip
    for f in figures:
        print(f"{f.label:<28} {f.packages:>5} {f.seconds:>8.2f} {f.batch_ms_per_package:>9.2f} "
              f"{f.recipe_ms_per_package:>10.2f} {f.ratio:>6.1f}x")  # fmt: skip
    print("ratio = recipe ms per package / wrap-batch ms per package (target: at least 5x)")
    print()
    print(f"start-up: python -m offline_packager --version {startup['byok_package_version_ms']:.1f} "
          f"ms, bare python -c pass {startup['bare_python_ms']:.1f} ms (medians)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--iterations",
        type=int,
        help="packages per type and method for single wraps, and recipe runs per batch type "
        "(default 60; 10 with --quick)",
    )
    parser.add_argument(
        "--batch-keys",
        type=int,
        help="EC P-256 and AES-256 keys per batch (default 200; 50 with --quick)",
    )
    parser.add_argument(
        "--rsa-keys",
        type=int,
        help="RSA-2048 key files in the RSA batch (default 100; 20 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller defaults: a quick look")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    iterations = args.iterations or (10 if args.quick else 60)
    batch_keys = args.batch_keys or (50 if args.quick else 200)
    rsa_keys = args.rsa_keys or (20 if args.quick else 100)
    if min(iterations, batch_keys, rsa_keys) < 1:
        parser.error("--iterations, --batch-keys and --rsa-keys must be at least 1")
    if shutil.which("openssl") is None:
        parser.error("the OpenSSL CLI is not on PATH (make deps installs it)")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="packager-bench-") as tmp:
        ws = make_workspace(Path(tmp))
        for type_name in TYPES:
            results.extend(measure(ws, type_name, m, iterations) for m in METHODS)
        batches = measure_batches(ws, batch_keys, rsa_keys, iterations)
    startup = startup_ms(max(5, iterations // 4))
    rel = ratios(results)
    if args.json:
        report = {
            "iterations": iterations,
            "python": sys.version.split()[0],
            "openssl": openssl_version(),
            "kek": "rsa-3072",
            "results": [asdict(r) for r in results],
            "ratios": rel,
            "batch": [asdict(b) for b in batches],
            "startup": startup,
        }
        print(json.dumps(report, indent=2))
    else:
        print_table(results, rel, iterations)
        print_batches(batches, startup)


if __name__ == "__main__":
    main()
