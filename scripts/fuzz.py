"""The mutation campaign: ``make fuzz`` (not part of ``make test``; a fixed-seed sample is).

Mutates valid packages of every target type and KEK size (JSON, kid, base64url, RSA-block and
KWP-block bit flips, truncation and extension, blob names, upload metadata) and runs them:

1. through the pipeline's checks in their documented order, importing what passes into the
   emulator's service in process (``--count``, default 100,000);
2. as import request bodies into the emulator's request path (``--bodies``);
3. through the whole pipeline (``process_blob``) against Azurite and the emulator over HTTPS,
   both started here on free loopback ports and stopped at the end (``--pipeline``).

Prints the figures and exits 1 if any of unhandled exceptions, packages imported, untyped
refusals or retries caused by input is not 0. Never prints key material or packages.

Run: ``.venv/bin/python scripts/fuzz.py [--count N] [--bodies N] [--pipeline N] [--seed S]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from byok_pipeline.localdev.fuzz import KEK_SIZES, Campaign, Tally, run_pipeline_share

COUNTERS = (
    "unhandled_exceptions",
    "packages_imported",
    "untyped_refusals",
    "retries_caused_by_input",
)


def _pipeline(campaign: Campaign, count: int, seed: int, tmp: Path) -> Tally:
    from azure.storage.blob import BlobServiceClient

    from byok_pipeline.localdev.azurite import Azurite
    from byok_pipeline.localdev.stack import emulator_deps
    from managed_hsm_emulator.testing import running_emulator

    with Azurite.start(tmp / "azurite") as az, running_emulator(tmp / "hsm") as hsm:
        client = hsm.key_client()
        kids = {
            bits: str(
                client.create_rsa_key(
                    f"fuzz-kek-{bits}",
                    size=bits,
                    key_operations=["import"],
                    hardware_protected=True,
                ).id
            )
            for bits in KEK_SIZES
        }
        service = BlobServiceClient.from_connection_string(az.connection_string)
        deps = emulator_deps(hsm, service, "fuzz")
        try:
            return run_pipeline_share(deps, campaign, count, seed, hsm_kids=kids)
        finally:
            service.close()


def _print(title: str, tally: Tally) -> None:
    summary = tally.summary()
    print(f"== {title}")
    for key in ("inputs", *COUNTERS, "duplicates", "passed_checks_refused_by_hsm", "seconds"):
        print(f"  {key:32} {summary[key]}")
    print(f"  {'inputs_per_second':32} {summary['inputs_per_second']}")
    print(f"  reasons: {json.dumps(summary['reasons'])}")
    for failure in tally.failures[:20]:
        print(f"  FAILED {failure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="mutants through the checks")
    parser.add_argument("--bodies", type=int, default=20_000, help="mutated emulator bodies")
    parser.add_argument("--pipeline", type=int, default=500, help="mutants through the pipeline")
    parser.add_argument("--seed", type=int, default=20261201)
    parser.add_argument("--json", action="store_true", help="print the totals as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="byok-fuzz-") as tmp:
        campaign = Campaign.create(Path(tmp) / "inproc")
        checks = campaign.run(args.count, args.seed)
        bodies = campaign.run_emulator_bodies(args.bodies, args.seed + 1)
        pipeline = (
            _pipeline(campaign, args.pipeline, args.seed + 2, Path(tmp))
            if args.pipeline
            else Tally()
        )
    total = Tally()
    for part in (checks, bodies, pipeline):
        total.merge(part)
    if args.json:
        print(json.dumps({"checks": checks.summary(), "emulator_bodies": bodies.summary(),
                          "pipeline": pipeline.summary(), "total": total.summary()}, indent=2))  # fmt: skip
    else:
        _print("checks in order, then the emulator's import (in process)", checks)
        _print("emulator request bodies (in process)", bodies)
        _print("whole pipeline: Azurite + emulator over HTTPS", pipeline)
        _print("total", total)
    return 1 if total.failed else 0


if __name__ == "__main__":
    sys.exit(main())
