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

Run: ``.venv/bin/python benchmarks/packager_bench.py [--iterations N] [--json]``.
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
from cryptography.hazmat.primitives.asymmetric import rsa

from offline_packager import cli
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
    if code != cli.EXIT_OK:
        raise RuntimeError(f"byok-package wrap exited {code} for {type_name}")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def run_openssl_recipe(ws: Workspace, type_name: str, out: Path) -> None:
    """The documented OpenSSL recipe, one subprocess per step, then the JSON."""
    key_file = ws.targets[type_name][0]
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--iterations", type=int, default=60, help="packages per type and method (default 60)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    if shutil.which("openssl") is None:
        parser.error("the OpenSSL CLI is not on PATH (make deps installs it)")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="packager-bench-") as tmp:
        ws = make_workspace(Path(tmp))
        for type_name in TYPES:
            results.extend(measure(ws, type_name, m, args.iterations) for m in METHODS)
    rel = ratios(results)
    if args.json:
        report = {
            "iterations": args.iterations,
            "python": sys.version.split()[0],
            "openssl": openssl_version(),
            "kek": "rsa-3072",
            "results": [asdict(r) for r in results],
            "ratios": rel,
        }
        print(json.dumps(report, indent=2))
    else:
        print_table(results, rel, args.iterations)


if __name__ == "__main__":
    main()
