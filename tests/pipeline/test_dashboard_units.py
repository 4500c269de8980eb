"""The dashboard without services: its figures from hand-made status documents, and the page
(escaping, Content-Security-Policy, nothing fetched)."""

from __future__ import annotations

import base64
import hashlib
import re
from datetime import UTC, datetime, timedelta

import pytest

from byok_pipeline.core.dashboard import TrailStatus, compute, percentile
from byok_pipeline.core.dashboard_page import assets, duration, headers, package_url, render
from byok_pipeline.core.status import HistoryEntry, StatusDoc, utc

NOW = datetime(2026, 5, 14, 12, 0, 0, tzinfo=UTC)
HOSTILE = "<img src=x onerror=alert(1)>.byok"
HOSTILE_WAITING = '"><script>alert(2)</script>.byok'


def _doc(
    name: str,
    state: str,
    *,
    dropped: timedelta,
    took: timedelta = timedelta(seconds=1),
    reason: str | None = None,
    audited: bool = True,
    **fields: object,
) -> StatusDoc:
    """A record dropped ``dropped`` before NOW that reached ``state`` ``took`` later."""
    drop = NOW - dropped
    doc = StatusDoc(
        blob_name=name,
        package_sha256=hashlib.sha256(name.encode()).hexdigest(),
        etag='"0x1"',
        correlation_id="c" * 32,
        drop_time=utc(drop),
        reason_code=reason,
        state=state,
        updated=utc(drop + took),
        **fields,  # type: ignore[arg-type]  # StatusDoc's own field names
    )
    doc.history = [
        HistoryEntry("received", utc(drop + timedelta(milliseconds=100)), 1, True),
        HistoryEntry(state, utc(drop + took), 1, audited),
    ]
    return doc


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(20, 0, -1)]  # unsorted on purpose
    assert percentile(values, 50) == 10
    assert percentile(values, 95) == 19
    assert percentile(values, 100) == 20
    assert percentile([7.0], 95) == 7
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="percentile"):
        percentile(values, 0)


def _sample() -> list[StatusDoc]:
    return [
        _doc("a.byok", "imported", dropped=timedelta(hours=1), took=timedelta(seconds=60)),
        _doc("b.byok", "imported", dropped=timedelta(hours=2), took=timedelta(seconds=120)),
        _doc("c.byok", "imported", dropped=timedelta(days=1), took=timedelta(seconds=600)),
        _doc("d.byok", "rejected", dropped=timedelta(hours=3), reason="malformed_package"),
        _doc("e.byok", "rejected", dropped=timedelta(hours=3), reason="malformed_package"),
        _doc(HOSTILE, "rejected", dropped=timedelta(hours=3), reason="bad_key_name"),
        _doc("f.byok", "failed", dropped=timedelta(hours=4), reason="attempts_exhausted"),
        _doc(
            "g.byok",
            "verification_failed",
            dropped=timedelta(hours=4),
            reason="fingerprint_mismatch",
            audited=False,
        ),
        _doc(
            "slow.byok",
            "importing",
            dropped=timedelta(hours=1),
            took=timedelta(minutes=59),
            throttled_until=utc(NOW + timedelta(seconds=30)),
        ),
        # a finished record's last throttle is history, not a throttled package
        _doc(
            "h.byok",
            "imported",
            dropped=timedelta(days=30),
            took=timedelta(seconds=30),
            throttled_until=utc(NOW - timedelta(days=30)),
        ),
    ]


def _incoming() -> list[tuple[str, datetime | None]]:
    return [
        ("slow.byok", NOW - timedelta(hours=1)),  # throttled, but its record moves: not lost
        ("new.byok", NOW - timedelta(seconds=30)),  # just dropped: its event is on the way
        (HOSTILE_WAITING, NOW - timedelta(hours=2)),  # no record for two hours: lost event
        ("a.byok", NOW - timedelta(minutes=20)),  # dropped again after its import
    ]


def test_figures_from_hand_made_status_documents() -> None:
    d = compute(_sample(), _incoming(), now=NOW)
    assert d.counts["imported"] == 4
    assert d.counts["rejected"] == 3
    assert (d.counts["failed"], d.counts["verification_failed"]) == (1, 1)
    assert (d.counts["importing"], d.counts["received"]) == (1, 0)
    assert (d.counts["waiting"], d.counts["throttled"]) == (4, 1)
    # drop to import: 60, 120, 600 and 30 s: nearest rank p50 = 2nd, p95 = 4th of 4
    assert (d.drop_to_import.count, d.drop_to_import.p50_seconds) == (4, 60)
    assert d.drop_to_import.p95_seconds == 600
    per_day = dict(d.imports_per_day)
    assert len(per_day) == 14
    assert list(per_day)[-1] == "2026-05-14"
    assert (per_day["2026-05-14"], per_day["2026-05-13"], per_day["2026-05-12"]) == (2, 1, 0)
    assert "2026-04-14" not in per_day  # 30 days ago: outside the chart's window
    assert d.refusals_by_reason == [("malformed_package", 2), ("bad_key_name", 1)]
    assert sorted(r.blob_name for r in d.failures) == ["f.byok", "g.byok"]
    assert [r.blob_name for r in d.throttled] == ["slow.byok"]
    assert d.audit_pending == 1
    waiting = {w.blob_name: w for w in d.waiting}
    assert [w.blob_name for w in d.waiting] == [HOSTILE_WAITING, "slow.byok", "a.byok", "new.byok"]
    assert (waiting["slow.byok"].state, waiting["slow.byok"].lost) == ("importing", False)
    assert (waiting[HOSTILE_WAITING].state, waiting[HOSTILE_WAITING].lost) == (None, True)
    assert waiting[HOSTILE_WAITING].age_seconds == 7200
    assert (waiting["a.byok"].state, waiting["a.byok"].lost) == (None, True)
    assert (waiting["new.byok"].state, waiting["new.byok"].lost) == (None, False)
    assert [r.blob_name for r in d.packages][:2] == ["slow.byok", "a.byok"]  # latest first


def test_no_documents_is_an_empty_dashboard() -> None:
    d = compute([], [], now=NOW)
    assert d.drop_to_import.p50_seconds is None
    assert sum(n for _, n in d.imports_per_day) == 0
    html = render(d)
    assert "No package has a status yet." in html
    assert "Nothing waits in incoming." in html


def test_the_page_escapes_every_stored_value() -> None:
    docs = _sample()
    docs[0].message = "</td><script>alert(3)</script>"
    docs[6].message = "<b onmouseover=alert(4)>x</b>"
    html = render(compute(docs, _incoming(), now=NOW, trail=TrailStatus(ok=True, chains=2)))
    assert html.count("<script>") == 1  # the page's own, at the end
    assert "<img" not in html
    assert "<b " not in html
    assert not re.search(r"<[a-zA-Z][^>]*\son[a-z]+\s*=", html), "an event handler attribute"
    assert "&lt;img src=x onerror=alert(1)&gt;.byok" in html
    assert "&quot;&gt;&lt;script&gt;alert(2)&lt;/script&gt;.byok" in html
    # links carry the name percent-encoded: no quote, angle bracket or slash survives
    assert package_url(HOSTILE) == "/api/packages/%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E.byok"
    assert f'href="{package_url(HOSTILE)}"' in html
    assert package_url("a/../../kek?x#y") == "/api/packages/a%2F..%2F..%2Fkek%3Fx%23y"


def test_the_policy_allows_exactly_the_inlined_style_and_script() -> None:
    html = render(compute(_sample(), _incoming(), now=NOW))
    csp = headers()["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    for tag, directive in (("style", "style-src"), ("script", "script-src")):
        (inline,) = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
        assert directives[directive] == f"'sha256-{digest}'"
        assert "unsafe" not in directives[directive]
    a = assets()
    assert a.css in html
    assert a.js in html
    # nothing is fetched: no external URL, no src, no style sheet link
    assert not re.search(r"https?://", html)
    assert not re.search(r"<[a-z]+[^>]*\ssrc=", html)
    assert "<link" not in html
    assert headers()["X-Content-Type-Options"] == "nosniff"


def test_durations_read_well() -> None:
    assert [duration(s) for s in (None, 0.4, 42, 60, 185, 3600, 7500, 200_000)] == [
        "-", "0 s", "42 s", "1 min", "3 min 5 s", "1 h", "2 h 5 min", "2 d 7 h",
    ]  # fmt: skip


def test_storage_down_is_a_503_page_with_the_same_policy() -> None:
    from types import SimpleNamespace
    from typing import Any, cast

    from byok_pipeline.core.errors import TransientError
    from byok_pipeline.processing import runtime

    def down() -> Any:
        raise TransientError("listing incoming: ServiceRequestError", reason="storage_error")

    store = SimpleNamespace(list_incoming_items=down, iter_statuses=down)
    runtime.set_deps_factory(lambda: cast("Any", SimpleNamespace(store=store, clock=lambda: NOW)))
    try:
        status, body, sent = runtime.dashboard()
    finally:
        runtime.set_deps_factory(None)
    assert status == 503
    assert b"[storage_error] listing incoming: ServiceRequestError" in body
    assert sent == headers()
