"""The pipeline's OpenTelemetry metrics: recorded through the real pipeline (Azurite + the
emulator, audited through the production sinks) and read back with an in-memory metric
reader; their names and attributes as documented; the dashboard's figures agree with them."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from audit_support import Audited, Metrics, Otel, leaks
from pipeline_support import Package, Stack
from testsupport import REPO

from byok_pipeline.adapters import telemetry
from byok_pipeline.core import metrics
from byok_pipeline.core.dashboard import compute
from byok_pipeline.core.dashboard_page import render
from byok_pipeline.core.reasons import REASONS
from byok_pipeline.core.status import STATES, StatusDoc, utc
from byok_pipeline.processing.dashboard import collect
from byok_pipeline.processing.reconcile import reconcile
from offline_packager.package_format import parse_package

NOW = datetime(2026, 5, 14, 12, 0, tzinfo=UTC)
#: What an attribute value may be: a state, a documented reason code, or "other".
ATTRIBUTE_VALUES = {
    metrics.STATE: set(STATES),
    metrics.REASON_CODE: set(REASONS) | {metrics.OTHER_REASON},
}


def _assert_only_documented_attributes(collected: Metrics) -> None:
    """Every data point carries only its metric's documented attributes, with values from the
    closed sets (never a name, kid, digest or key material)."""
    for point in collected.points:
        spec = metrics.METRICS[point.metric]
        assert set(point.attributes) <= spec.attributes, point
        for key, value in point.attributes.items():
            assert value in ATTRIBUTE_VALUES[key], point


def _imported(stack: Stack, type_name: str, name: str) -> Package:
    pkg = stack.package(type_name, name)
    stack.drop_package(pkg)
    assert stack.deliver(pkg.name).state == "imported"
    return pkg


def _throttled(stack: Stack, type_name: str, name: str) -> Package:
    """A package delivered while the HSM answers its import with 429 (retry after 120 s): it
    is handed back, ``throttled_until`` two minutes ahead, and waits in incoming."""
    pkg = stack.package(type_name, name)
    stack.drop_package(pkg)
    stack.deliver_throttled(pkg)
    return pkg


# -- through the pipeline ---------------------------------------------------------------------

pipeline = pytest.mark.azurite


@pipeline
def test_an_imported_package_counts_once_and_records_its_drop_to_import(
    audited: Audited,
) -> None:
    pkg = _imported(audited.stack, "ec-p256", "metric-ok")

    collected = audited.otel.collect()
    for state in ("received", "validated", "importing", "imported"):
        assert collected.counter(metrics.PACKAGES, state=state) == 1, state
    assert collected.counter(metrics.PACKAGES, state="rejected", reason_code="other") == 0
    (histogram,) = collected.of(metrics.DROP_TO_IMPORT)
    assert histogram.count == 1
    assert histogram.sum is not None
    assert histogram.sum >= 0
    assert histogram.attributes == {}
    # the same seconds as the status document says (drop_time to the imported entry)
    doc = audited.stack.deps.store.status_by_name(pkg.name)
    assert doc is not None
    took = metrics.drop_to_import_seconds(
        doc.drop_time, next(h.time for h in doc.history if h.state == "imported")
    )
    assert histogram.sum == pytest.approx(took)
    _assert_only_documented_attributes(collected)
    # byok.verified is not a second import
    assert sum(p.value or 0 for p in collected.of(metrics.PACKAGES)) == 4


@pipeline
def test_a_rejected_package_counts_under_its_reason_code(audited: Audited) -> None:
    stack, otel = audited.stack, audited.otel
    stack.drop("metric-garbage.byok", b"{not a package", {})
    assert stack.deliver("metric-garbage.byok").reason_code == "malformed_package"
    stack.drop("bad name.byok", b"{}", {})
    assert stack.deliver("bad name.byok").reason_code == "bad_key_name"

    collected = otel.collect()
    packages = metrics.PACKAGES
    assert collected.counter(packages, state="rejected", reason_code="malformed_package") == 1
    assert collected.counter(packages, state="rejected", reason_code="bad_key_name") == 1
    assert collected.counter(packages, state="imported") == 0
    assert collected.of(metrics.DROP_TO_IMPORT) == []
    _assert_only_documented_attributes(collected)


@pipeline
def test_a_throttled_hand_back_shows_in_the_gauges_of_the_reconciler_pass(
    audited: Audited,
) -> None:
    stack, otel = audited.stack, audited.otel
    slow = _throttled(stack, "ec-p256", "metric-slow")
    stack.drop_package(stack.package("ec-p384", "metric-waiting"))  # never delivered

    before = otel.collect()
    assert before.gauge(metrics.WAITING) is None  # nothing computed the backlog yet
    report = reconcile(stack.deps)
    assert slow.name not in report.redelivered  # paced: its next try is later
    collected = otel.collect()
    assert collected.gauge(metrics.THROTTLED) == 1
    assert collected.gauge(metrics.WAITING) == 2
    # a throttled hand-back is never counted as a state: the package is still importing
    assert collected.counter(metrics.PACKAGES, state="importing") == 1
    assert collected.counter(metrics.PACKAGES, state="failed", reason_code="other") == 0
    # each computation is reported once: no stale copy at the next collection
    assert otel.collect().gauge(metrics.THROTTLED) is None
    _assert_only_documented_attributes(collected)


@pipeline
def test_the_dashboard_shows_the_figures_the_metrics_carry(audited: Audited) -> None:
    """``byok serve``'s page and the metrics over the same packages: counts per final state and
    per refusal reason equal the counter, the drop-to-import figures the histogram's, and the
    waiting and throttled counts the gauges (one computation)."""
    stack, otel = audited.stack, audited.otel
    imported = [_imported(stack, t, f"agree-{t}") for t in ("ec-p256", "oct-256")]
    stack.drop("agree-bad.byok", b"garbage")
    assert stack.deliver("agree-bad.byok").reason_code == "malformed_package"
    _throttled(stack, "ec-p256", "agree-slow")
    stack.drop_package(stack.package("ec-p384", "agree-waiting"))

    figures = collect(stack.deps)
    collected = otel.collect()
    for state in ("imported", "rejected", "failed", "verification_failed", "duplicate"):
        counted = sum(p.value or 0 for p in collected.of(metrics.PACKAGES)
                      if p.attributes.get("state") == state)  # fmt: skip
        assert counted == figures.counts[state], state
    for reason, n in figures.refusals_by_reason:
        assert collected.counter(metrics.PACKAGES, state="rejected", reason_code=reason) == n
    (histogram,) = collected.of(metrics.DROP_TO_IMPORT)
    assert histogram.count == figures.drop_to_import.count == 2
    # two imports: nearest-rank p50 is the shorter, p95 the longer
    assert histogram.min == pytest.approx(figures.drop_to_import.p50_seconds)
    assert histogram.max == pytest.approx(figures.drop_to_import.p95_seconds)
    assert collected.gauge(metrics.WAITING) == figures.counts["waiting"] == 2
    assert collected.gauge(metrics.THROTTLED) == figures.counts["throttled"] == 1
    page = render(figures)
    for name in metrics.METRICS:
        assert f'data-metric-name="{name}"' in page
    assert "waiting in the incoming container: 2" in page
    assert "throttled by the HSM: 1" in page

    # no secret material anywhere in what the metrics export
    outputs = {"metrics": collected.json.encode()}
    for pkg in imported:
        ciphertext = parse_package(pkg.data).ciphertext
        assert leaks(pkg.target.plaintext.reveal(), outputs) == [], pkg.name
        assert leaks(ciphertext, outputs) == [], pkg.name
        assert pkg.name.encode() not in outputs["metrics"]
    _assert_only_documented_attributes(collected)


# -- without services ---------------------------------------------------------------------------


def _section(text: str, heading: str) -> str:
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_metric_names_match_the_documented_list(otel: Otel) -> None:
    """The instruments the telemetry adapter creates are exactly METRICS (names, units,
    descriptions), and the README's Metrics table lists exactly them with their instrument,
    unit and attributes."""
    sink = telemetry.TelemetryAuditSink()
    sink.emit({"event": "byok.imported", "state": "imported", "time": utc(NOW),
               "drop_time": utc(NOW - timedelta(seconds=90))})  # fmt: skip
    telemetry.observe_backlog(metrics.Backlog(waiting=3, throttled=1))
    collected = otel.collect()
    assert set(collected.units) == set(metrics.METRICS)
    for name, spec in metrics.METRICS.items():
        assert collected.units[name] == spec.unit
        assert collected.descriptions[name] == spec.description
        assert re.fullmatch(r"byok\.[a-z_]+", name), name
    assert collected.of(metrics.DROP_TO_IMPORT)[0].sum == 90

    rows = {}
    for line in _section((REPO / "README.md").read_text(encoding="utf-8"), "Metrics").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `byok."):
            rows[cells[0].strip("`")] = cells
    assert set(rows) == set(metrics.METRICS)
    for name, spec in metrics.METRICS.items():
        _, instrument, unit, attributes = rows[name][:4]
        assert instrument == spec.instrument.replace("_", " "), name
        assert unit == f"`{spec.unit}`", name
        documented = set(re.findall(r"`(\w+)`", attributes))
        assert documented == set(spec.attributes), name


def test_attributes_are_closed_sets() -> None:
    assert metrics.package_attributes("imported") == {"state": "imported"}
    assert metrics.package_attributes("imported", "hsm_refused") == {"state": "imported"}
    assert metrics.package_attributes("rejected", "kek_expired") == {
        "state": "rejected",
        "reason_code": "kek_expired",
    }
    # a free-form reason (never expected) is not exported as it is
    secretish = "https://h.managedhsm.azure.net/keys/payments/0123"
    assert metrics.package_attributes("failed", secretish)["reason_code"] == "other"
    assert metrics.package_attributes("rejected")["reason_code"] == "other"
    with pytest.raises(ValueError, match="not a package state"):
        metrics.package_attributes("waiting")
    assert (
        set(metrics.package_attributes("failed", "attempts_exhausted")) == metrics.METRIC_ATTRIBUTES
    )
    for spec in metrics.METRICS.values():
        assert spec.attributes <= metrics.METRIC_ATTRIBUTES


def test_only_state_events_count(otel: Otel) -> None:
    """``byok.verified`` (a second event with state imported), KEK and policy events and a
    mislabelled event record nothing."""
    sink = telemetry.TelemetryAuditSink()
    sink.emit_many([
        {"event": "byok.verified", "state": "imported", "time": utc(NOW)},
        {"event": "byok.kek.created", "kek_kid": "https://h/keys/k/v"},
        {"event": "byok.policy.changed"},
        {"event": "byok.rejected", "state": "imported"},
        {"event": "byok.rejected", "state": "rejected", "reason_code": "bad_kid",
         "key_name": "payments", "package_sha256": "0" * 64},
    ])  # fmt: skip
    collected = otel.collect()
    assert [(p.attributes, p.value) for p in collected.of(metrics.PACKAGES)] == [
        ({"state": "rejected", "reason_code": "bad_kid"}, 1)
    ]
    assert collected.of(metrics.DROP_TO_IMPORT) == []


def test_drop_to_import_seconds() -> None:
    dropped = utc(NOW)
    assert metrics.drop_to_import_seconds(dropped, utc(NOW + timedelta(minutes=2))) == 120
    assert metrics.drop_to_import_seconds(None, dropped) is None
    assert metrics.drop_to_import_seconds(dropped, "not a time") is None
    # another machine's clock put the import before the drop: no figure rather than a negative
    assert metrics.drop_to_import_seconds(dropped, utc(NOW - timedelta(seconds=1))) is None


def _doc(name: str, state: str, throttled_until: datetime | None) -> StatusDoc:
    doc = StatusDoc(name, "0" * 64, '"e"', "c" * 32)
    doc.advance("received", NOW - timedelta(hours=1))
    if state != "received":
        doc.advance("validated", NOW - timedelta(hours=1))
        doc.advance("importing", NOW - timedelta(hours=1))
    if state == "imported":
        doc.advance("imported", NOW - timedelta(minutes=30))
    doc.throttled_until = utc(throttled_until) if throttled_until else None
    return doc


def test_the_backlog_counts_blobs_waiting_and_packages_throttled_ahead() -> None:
    docs = [
        _doc("ahead.byok", "importing", NOW + timedelta(seconds=30)),
        _doc("passed.byok", "importing", NOW - timedelta(seconds=1)),  # its next try is due
        _doc("done.byok", "imported", NOW + timedelta(days=1)),  # finished: not throttled
        _doc("never.byok", "received", None),
    ]
    incoming = [("ahead.byok", NOW), ("passed.byok", None), ("new.byok", NOW)]
    assert metrics.backlog(docs, incoming, NOW) == metrics.Backlog(waiting=3, throttled=1)
    d = compute(docs, incoming, now=NOW)
    assert (d.counts["waiting"], d.counts["throttled"]) == (3, 1)
    assert d.backlog == metrics.Backlog(3, 1)
    assert [r.blob_name for r in d.throttled] == ["ahead.byok"]


def test_gauges_report_each_backlog_once(otel: Otel) -> None:
    telemetry.observe_backlog(metrics.Backlog(waiting=5, throttled=2))
    telemetry.observe_backlog(metrics.Backlog(waiting=4, throttled=0))  # the newer one wins
    first = otel.collect()
    assert (first.gauge(metrics.WAITING), first.gauge(metrics.THROTTLED)) == (4, 0)
    again = otel.collect()
    assert (again.gauge(metrics.WAITING), again.gauge(metrics.THROTTLED)) == (None, None)


def test_the_local_exporter_writes_metrics_as_json_lines(tmp_path: Path) -> None:
    telemetry.reset()
    path = tmp_path / "telemetry.jsonl"
    try:
        tel = telemetry.configure_once(None, {"BYOK_TELEMETRY_LOG": str(path)})
        telemetry.TelemetryAuditSink().emit(
            {"event": "byok.rejected", "state": "rejected", "reason_code": "bad_kid"}
        )
        telemetry.observe_backlog(metrics.Backlog(waiting=1, throttled=0))
        tel.force_flush()
    finally:
        telemetry.reset()
        for provider in tel.providers:
            provider.shutdown()  # its periodic reader's thread too
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    exported: dict[str, Any] = {}
    for line in lines:
        for resource in line.get("resource_metrics", []):
            for scope in resource["scope_metrics"]:
                assert scope["scope"]["name"] == metrics.METER
                exported.update({m["name"]: m for m in scope["metrics"]})
    assert {metrics.PACKAGES, metrics.WAITING, metrics.THROTTLED} <= set(exported)
    (point,) = exported[metrics.PACKAGES]["data"]["data_points"]
    assert (point["attributes"], point["value"]) == (
        {"state": "rejected", "reason_code": "bad_kid"},
        1,
    )
    assert exported[metrics.WAITING]["data"]["data_points"][0]["value"] == 1


def test_azure_monitor_exports_the_metrics_through_the_distros_meter_provider(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """In Azure the instruments live on the meter provider ``configure_azure_monitor`` set up
    (its periodic reader and exporter: AppMetrics), like the spans and log records; the
    distro's metrics are on (OTEL_METRICS_EXPORTER=none would turn them off: warned)."""
    import azure.monitor.opentelemetry as distro
    from audit_support import neutral_distro_env, resolved
    from azure.monitor.opentelemetry._constants import DISABLE_METRICS_ARG
    from opentelemetry.metrics import get_meter_provider

    neutral_distro_env(monkeypatch)
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(distro, "configure_azure_monitor", lambda **kw: calls.append(kw))
    telemetry.reset()
    try:
        tel = telemetry.configure_once(
            None, {"APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=x"}
        )
        assert tel.exporter == "azure-monitor"
        assert tel.metrics is not None
        assert get_meter_provider() in tel.providers
    finally:
        telemetry.reset()
    assert resolved(calls[0])[DISABLE_METRICS_ARG] is False
    env = {"APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=x",
           "OTEL_METRICS_EXPORTER": "none"}  # fmt: skip
    with caplog.at_level("WARNING", logger="byok_pipeline.adapters.telemetry"):
        telemetry.azure_monitor_options(env)
    assert "OTEL_METRICS_EXPORTER=none" in caplog.text
