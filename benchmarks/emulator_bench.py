"""Emulator throughput through the real SDK: get_key and BYOK import requests per second.

Not a test: it prints figures, so we know the emulator is never the bottleneck of pipeline
benchmarks. Run: ``.venv/bin/python benchmarks/emulator_bench.py [--requests N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from azure.keyvault.keys import JsonWebKey
from cryptography.hazmat.primitives.asymmetric import rsa

from managed_hsm_emulator.testing import EmulatorHandle, running_emulator
from offline_packager.keytypes import TARGET_TYPES
from offline_packager.package_format import encode_package
from offline_packager.target_keys import generate_target
from offline_packager.wrap import wrap_target


def _rate(label: str, count: int, threads: int, work: Callable[[int], object]) -> None:
    per_thread = max(1, count // threads)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            for j in range(per_thread):
                work(i * per_thread + j)
        except BaseException as exc:  # noqa: BLE001  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{label}: {len(errors)} thread(s) failed: {errors[0]!r}")
    total = per_thread * threads
    print(f"{label:<40} {total:>6} requests  {elapsed:7.2f} s  {total / elapsed:8.1f} req/s")


def bench(hsm: EmulatorHandle, requests: int, threads: int) -> None:
    client = hsm.key_client()
    kek = client.create_rsa_key("bench-kek", size=3072, key_operations=["import"])
    if kek.id is None:
        raise RuntimeError("the emulator returned a key without kid")
    n, e = getattr(kek.key, "n"), getattr(kek.key, "e")  # noqa: B009  # dynamic JWK fields
    kek_public = rsa.RSAPublicNumbers(
        int.from_bytes(e, "big"), int.from_bytes(n, "big")
    ).public_key()
    client.create_ec_key("bench-key", curve="P-256")
    clients = [hsm.key_client() for _ in range(threads)]
    for c in clients:
        c.get_key("bench-key")  # challenge round-trip outside the timing

    print(f"emulator {hsm.url}, {threads} client thread(s)")
    _rate("get_key (1 thread)", requests, 1, lambda _i: clients[0].get_key("bench-key"))
    _rate(
        f"get_key ({threads} threads)",
        requests,
        threads,
        lambda i: clients[i % threads].get_key("bench-key"),
    )
    for type_name in ("oct-256", "ec-p256", "rsa-2048"):
        target = generate_target(type_name)
        ttype = TARGET_TYPES[type_name]
        package = encode_package(kek.id, wrap_target(kek_public, target.plaintext), "bench")
        jwk = JsonWebKey(kty=ttype.kty, crv=ttype.crv, t=package)
        count = max(threads, requests // 4)
        _rate(
            f"BYOK import {type_name} ({threads} threads)",
            count,
            threads,
            lambda i, jwk=jwk, name=type_name: clients[i % threads].import_key(  # type: ignore[misc]  # default args bind the loop values
                f"bench-{name}", jwk, hardware_protected=True
            ),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400, help="get_key requests per run")
    parser.add_argument("--threads", type=int, default=4, help="client threads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, running_emulator(Path(tmp) / "hsm") as hsm:
        bench(hsm, args.requests, args.threads)


if __name__ == "__main__":
    main()
