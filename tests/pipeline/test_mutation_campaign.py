"""The mutation campaign's fixed-seed sample (``make fuzz`` runs 100,000; docs/reference.md "Reliability"),
its regression cases, and a check that its counters count.

- 5,000 mutants through the pipeline's checks in order and the emulator's import (in process);
- 1,000 mutated request bodies into the emulator's request path;
- 40 mutants through the whole pipeline against Azurite and the emulator over HTTPS;
- every input that failed on the code before issue 15 (``mutation_regressions.json``).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from pipeline_support import Stack

from byok_pipeline.core.errors import Rejected, TransientError
from byok_pipeline.core.identity import package_id
from byok_pipeline.core.metadata import ImportOptions
from byok_pipeline.localdev import fuzz
from byok_pipeline.localdev.fuzz import KEK_SIZES, Campaign, Mutant, Seed, Tally
from offline_packager.kid import parse_kid
from offline_packager.package_format import parse_package

SEED = 20261201
SAMPLE = 5_000
REGRESSIONS = json.loads(Path(__file__).with_name("mutation_regressions.json").read_text())


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Campaign:
    return Campaign.create(tmp_path_factory.mktemp("fuzz") / "hsm")


def _zero(tally: Tally) -> None:
    assert tally.failures == []
    assert (tally.unhandled, tally.imported, tally.untyped, tally.retries) == (0, 0, 0, 0)


def test_fixed_seed_sample_through_the_checks(campaign: Campaign) -> None:
    tally = campaign.run(SAMPLE, SEED)
    assert tally.inputs == SAMPLE
    _zero(tally)
    # the sample reaches every stage: each family of refusal, the identity, the HSM's unwrap
    for reason in ("malformed_package", "bad_kid", "bad_base64", "bad_key_name", "bad_metadata",
                   "ciphertext_length_mismatch", "kek_mismatch", "hsm_refused/kwp_integrity",
                   "hsm_refused/rsa_unwrap_failed"):  # fmt: skip
        assert tally.reasons[reason] > 0, reason
    assert tally.duplicates > 0


def test_fixed_seed_sample_of_emulator_bodies(campaign: Campaign) -> None:
    tally = campaign.run_emulator_bodies(1_000, SEED + 1)
    assert tally.inputs == 1_000
    _zero(tally)
    assert tally.reasons["emulator_400"] > 900


@pytest.mark.azurite
def test_fixed_seed_sample_through_the_whole_pipeline(stack: Stack, campaign: Campaign) -> None:
    client = stack.hsm.key_client()
    kids = {
        bits: str(
            client.create_rsa_key(
                f"{stack.settings.incoming_container}-kek-{bits}",
                size=bits,
                key_operations=["import"],
                hardware_protected=True,
            ).id
        )
        for bits in KEK_SIZES
    }
    tally = fuzz.run_pipeline_share(stack.deps, campaign, 40, SEED + 2, hsm_kids=kids)
    assert tally.inputs >= 30  # a few names the storage itself refuses are not dropped
    _zero(tally)
    assert sum(tally.reasons.values()) + tally.duplicates == tally.inputs
    assert stack.blobs(stack.settings.incoming_container) == []


def test_the_counters_count(campaign: Campaign, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each counter goes up when its failure happens (so a zero means something)."""

    def bug(*_args: Any, **_kwargs: Any) -> Any:
        raise ValueError

    def transient(*_args: Any, **_kwargs: Any) -> Any:
        raise TransientError("x")

    def untyped(*_args: Any, **_kwargs: Any) -> Any:
        raise Rejected("no_such_reason", "x")

    for patch, counter in ((bug, "unhandled"), (transient, "retries"), (untyped, "untyped")):
        with monkeypatch.context() as m:
            m.setattr(fuzz, "read_package", patch)
            m.setattr(fuzz, "check_drop", lambda *_a: ("k", ImportOptions()))
            tally = campaign.run(20, SEED)
        assert getattr(tally, counter) == 20, counter
    with monkeypatch.context() as m:  # an HSM that imports whatever passes the checks
        m.setattr(Campaign, "identities", frozenset())
        m.setattr(campaign.hsm, "import_package", lambda *_a: None)
        tally = campaign.run(300, SEED)
    assert tally.imported > 0


def _case_id(case: dict[str, Any]) -> str:
    return f"{case['kind']}-{case['old'].split(':')[0].lower()}-{case['now']}"


@pytest.mark.parametrize("case", REGRESSIONS["cases"], ids=_case_id)
def test_regression_case(campaign: Campaign, case: dict[str, Any]) -> None:
    data = base64.b64decode(case["package_b64"])
    seed = Seed(case["type"], case["kek_bits"], case["blob_name"], b"", {}, "", "")
    if case["now"] == "dup":
        # the same wrapped key for the same KEK as a valid package: its canonical identity
        package = parse_package(data)
        assert package_id(package, parse_kid(package.kid)) == case["identity"]
        return
    for bits, old_kid in REGRESSIONS["keks"].items():  # the KEKs of this campaign, same sizes
        new_kid = campaign.hsm.keks[int(bits)][0]
        data = data.replace(old_kid.rsplit("/", 1)[1].encode(), new_kid.rsplit("/", 1)[1].encode())
    tally = Tally()
    campaign.check(Mutant(case["kind"], seed, case["blob_name"], data, case["metadata"]), tally)
    _zero(tally)
    assert list(tally.reasons) == [case["now"]]
