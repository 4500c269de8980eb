"""The dashboard as one HTML page: :func:`render` turns a :class:`~.dashboard.Dashboard` into
markup, :func:`headers` gives the response headers that go with it.

Pure and self-contained: the page's only style sheet and script ship in this package
(``dashboard_assets/``) and are inlined, each allowed by its SHA-256 in the
Content-Security-Policy (no ``unsafe-inline``, nothing fetched from anywhere, no CDN). Every
value from storage is escaped (blob names are chosen by whoever uploads), links carry
percent-encoded names, and the page holds no secret: no function key, no connection string.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape
from importlib import resources
from urllib.parse import quote

from byok_pipeline.core import metrics
from byok_pipeline.core.dashboard import Dashboard, PackageRow, TrailStatus
from byok_pipeline.core.reasons import REASONS
from byok_pipeline.core.status import TERMINAL

#: Where the page links a package's JSON (the Function's ``get_package`` route).
PACKAGE_API = "/api/packages/"
#: Tiles in this order; the states a package row can have are filterable.
_TILES = (
    ("imported", "good"),
    ("rejected", "bad"),
    ("failed", "bad"),
    ("verification_failed", "bad"),
    ("duplicate", ""),
    ("received", "warn"),
    ("awaiting_approval", "warn"),
    ("validated", "warn"),
    ("importing", "warn"),
    ("waiting", "warn"),
    ("throttled", "warn"),
)
_NOT_ROW_STATES = frozenset({"waiting", "throttled"})
_NUM = ' class="num"'


@dataclass(frozen=True)
class Assets:
    css: str
    js: str
    csp: str


def _sha256_source(text: str) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return "'sha256-" + base64.b64encode(digest).decode() + "'"


@functools.cache
def assets() -> Assets:
    """The style sheet and script shipped in the package, and the policy that allows exactly
    them (by hash) and nothing else."""
    folder = resources.files("byok_pipeline.core") / "dashboard_assets"
    css = (folder / "dashboard.css").read_text(encoding="utf-8")
    js = (folder / "dashboard.js").read_text(encoding="utf-8")
    csp = "; ".join(
        (
            "default-src 'none'",
            f"script-src {_sha256_source(js)}",
            f"style-src {_sha256_source(css)}",
            "img-src 'none'",
            "connect-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )
    return Assets(css, js, csp)


def headers() -> dict[str, str]:
    """The response headers of the page (and of its error page)."""
    return {
        "Content-Type": "text/html; charset=utf-8",
        "Content-Security-Policy": assets().csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
        "X-Frame-Options": "DENY",
    }


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def package_url(blob_name: str) -> str:
    """The JSON of one package: its name percent-encoded whole (no ``/``, ``?`` or ``#`` can
    change which route it reaches)."""
    return PACKAGE_API + quote(blob_name, safe="")


def duration(seconds: float | None) -> str:
    """``42 s``, ``3 min 5 s``, ``2 h 10 min``, ``3 d 4 h``; ``-`` for None."""
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    minutes, s = divmod(s, 60)
    if minutes < 60:
        return f"{minutes} min {s} s" if s else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def _time(text: str | None) -> str:
    if not text:
        return '<span class="muted">-</span>'
    shown = text.replace("T", " ")[:19] + "Z" if len(text) >= 19 else text
    return f'<time datetime="{_e(text)}">{_e(shown)}</time>'


def _state(state: str | None) -> str:
    if not state:
        return '<span class="muted">not delivered yet</span>'
    return f'<span class="state state-{_e(state)}">{_e(state)}</span>'


def _table(headings: Sequence[str], rows: Iterable[str], empty: str) -> str:
    body = "".join(rows)
    if not body:
        return f'<p class="empty">{_e(empty)}</p>'
    head = "".join(
        f"<th{_NUM if h.startswith('#') else ''}>{_e(h.lstrip('#'))}</th>" for h in headings
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Ids:
    """Stable element ids of the packages' history, so other panels can link to them."""

    def __init__(self, rows: Sequence[PackageRow]) -> None:
        self._ids = {row: f"pkg-{n}" for n, row in enumerate(rows, 1)}

    def __getitem__(self, row: PackageRow) -> str:
        return self._ids[row]

    def link(self, row: PackageRow) -> str:
        return f'<a href="#{self[row]}">{_e(row.blob_name)}</a>'


def _tiles(d: Dashboard) -> str:
    items = []
    for state, tone in _TILES:
        n = d.counts.get(state, 0)
        classes = " ".join(c for c in ("tile", tone, "zero" if not n else "") if c)
        label = state.replace("_", " ")
        inner = f'<span class="count">{n}</span><span class="label">{_e(label)}</span>'
        if state in _NOT_ROW_STATES:
            items.append(f'<li class="{classes}" data-state="{state}">{inner}</li>')
        else:
            items.append(
                f'<li><button type="button" class="{classes}" data-state="{state}" '
                f'data-filter aria-pressed="false" title="show only {_e(label)} packages">'
                f"{inner}</button></li>"
            )
    return f'<ul class="tiles">{"".join(items)}</ul>'


def _chart(per_day: Sequence[tuple[str, int]]) -> str:
    width, height, top, bottom = 700, 140, 14, 18
    peak = max((n for _, n in per_day), default=0) or 1
    slot = width / max(1, len(per_day))
    parts = []
    for i, (day, n) in enumerate(per_day):
        bar = (height - top - bottom) * n / peak
        x = i * slot + slot * 0.15
        y = height - bottom - bar
        parts.append(
            f'<g data-day="{_e(day)}" data-count="{n}"><title>{_e(day)}: {n} imported</title>'
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" '
            f'height="{bar:.1f}"></rect>'
            + (
                f'<text class="value" x="{x + slot * 0.35:.1f}" y="{y - 3:.1f}" '
                f'text-anchor="middle">{n}</text>'
                if n
                else ""
            )
            + f'<text class="axis" x="{x + slot * 0.35:.1f}" y="{height - 5}" '
            f'text-anchor="middle">{_e(day[5:])}</text></g>'
        )
    total = sum(n for _, n in per_day)
    return (
        f'<svg class="chart" viewBox="0 0 {width} {height}" preserveAspectRatio="none" '
        f'role="img" aria-label="{total} imports in the last {len(per_day)} days">'
        f"{''.join(parts)}</svg>"
    )


def _reason_cell(code: str | None) -> str:
    if not code:
        return '<span class="muted">-</span>'
    text = REASONS.get(code)
    hint = f'<div class="reason-text">{_e(text)}</div>' if text else ""
    return f'<code class="reason" data-reason="{_e(code)}">{_e(code)}</code>{hint}'


def _refusals(d: Dashboard) -> str:
    rows = (
        f'<tr data-reason="{_e(code)}"><td>{_reason_cell(code)}</td>'
        f'<td class="num" data-count="{n}">{n}</td></tr>'
        for code, n in d.refusals_by_reason
    )
    return _table(("reason code", "#packages"), rows, "No package was refused.")


def _failures(d: Dashboard, ids: _Ids) -> str:
    rows = (
        f'<tr class="failure"><td class="name">{ids.link(r)}</td><td>{_state(r.state)}</td>'
        f"<td>{_reason_cell(r.reason_code)}</td><td>{_e(r.message or r.last_error or '')}</td>"
        f"<td>{_time(r.updated)}</td></tr>"
        for r in d.failures
    )
    return _table(("package", "state", "reason", "message", "when"), rows, "No failures.")


def _waiting_rows(d: Dashboard) -> Iterable[str]:
    for w in d.waiting:
        flag = ' <span class="lost">lost event?</span>' if w.lost else ""
        name = _e(w.blob_name)
        if w.state is not None:  # it has a record: link its JSON
            name = f'<a href="{_e(package_url(w.blob_name))}">{name}</a>'
        yield (
            f'<tr class="waiting{" lost-row" if w.lost else ""}" data-blob="{_e(w.blob_name)}">'
            f'<td class="name">{name}</td>'
            f'<td class="num" data-age-seconds="{"" if w.age_seconds is None else round(w.age_seconds)}">'
            f"{_e(duration(w.age_seconds))}{flag}</td>"
            f"<td>{_state(w.state)}</td><td>{_time(w.since)}</td></tr>"
        )


def _waiting(d: Dashboard) -> str:
    note = (
        f'<p class="muted">A blob waiting over {_e(duration(d.lost_after_seconds))} with no '
        "progress probably lost its event: <code>byok reconcile</code> (or the Function's timer) "
        "delivers it again.</p>"
    )
    table = _table(
        ("blob", "#age", "state", "dropped"), _waiting_rows(d), "Nothing waits in incoming."
    )
    return table + note


def _throttled(d: Dashboard, ids: _Ids) -> str:
    rows = (
        f'<tr class="throttled"><td class="name">{ids.link(r)}</td><td>{_state(r.state)}</td>'
        f'<td>{_time(r.throttled_until)}</td><td class="num">{r.attempts}</td></tr>'
        for r in d.throttled
    )
    return _table(
        ("package", "state", "next try after", "#attempts"), rows, "Nothing is throttled."
    )


def _drop_to_import(d: Dashboard) -> str:
    m = d.drop_to_import
    return (
        '<dl class="metrics">'
        f'<dt>imported packages</dt><dd data-metric="count">{m.count}</dd>'
        f'<dt>p50</dt><dd data-metric="p50">{_e(duration(m.p50_seconds))}</dd>'
        f'<dt>p95</dt><dd data-metric="p95">{_e(duration(m.p95_seconds))}</dd>'
        "</dl>"
    )


def _trail(trail: TrailStatus | None) -> str:
    if trail is None:
        return (
            '<dd data-metric="trail">not checked here: run <code>byok audit verify --trust '
            "FILE</code></dd>"
        )
    if trail.error:
        return f'<dd data-metric="trail" class="bad">could not verify: {_e(trail.error)}</dd>'
    if not trail.ok:
        return f'<dd data-metric="trail" class="bad">BROKEN: {trail.breaks} break(s)</dd>'
    if not trail.chains:
        return '<dd data-metric="trail" class="ok">intact (empty: no records yet)</dd>'
    pinned = "signers pinned" if trail.pinned else "signers not pinned by a trust file"
    return (
        f'<dd data-metric="trail" class="ok">intact: {trail.chains} chain(s), '
        f"{trail.records} record(s); {pinned}</dd>"
    )


def _audit(d: Dashboard) -> str:
    tone = "bad" if d.audit_pending else "ok"
    return (
        '<dl class="metrics">'
        f'<dt>records pending</dt><dd data-metric="audit-pending" class="{tone}">'
        f"{d.audit_pending} package(s)</dd>"
        f"<dt>trail</dt>{_trail(d.trail)}</dl>"
        '<p class="muted">Pending: state changes not yet appended to the signed trail; the '
        "next delivery or the reconciler completes them.</p>"
    )


def _metric_rows(d: Dashboard) -> Iterable[tuple[str, str]]:
    """(metric name, the figure of this page it carries), in :data:`metrics.METRICS` order."""
    finals = " · ".join(
        f"{state} {d.counts.get(state, 0)}" for state, _ in _TILES if state in TERMINAL
    )
    m = d.drop_to_import
    figures = {
        metrics.PACKAGES: f"packages per state (the tiles): {finals}",
        metrics.DROP_TO_IMPORT: (
            f"drop to import: {m.count} import(s), p50 {duration(m.p50_seconds)}, "
            f"p95 {duration(m.p95_seconds)}"
        ),
        metrics.WAITING: f"waiting in the incoming container: {d.backlog.waiting}",
        metrics.THROTTLED: f"throttled by the HSM: {d.backlog.throttled}",
    }
    for name in metrics.METRICS:
        yield name, figures[name]


def _metrics(d: Dashboard) -> str:
    rows = (
        f'<tr data-metric-name="{_e(name)}"><td><code>{_e(name)}</code></td>'
        f"<td>{_e(metrics.METRICS[name].instrument.replace('_', ' '))}</td>"
        f"<td>{_e(figure)}</td></tr>"
        for name, figure in _metric_rows(d)
    )
    note = (
        '<p class="muted">The same figures as OpenTelemetry metrics (Application Insights: '
        "table <code>AppMetrics</code>). The gauges are reported from this very computation, "
        "at each view and each reconciler pass; the counter and the histogram are recorded "
        "with each package's audit event, so over the same packages they add up to the counts "
        "and durations shown here.</p>"
    )
    return _table(("metric", "instrument", "figure on this page"), rows, "") + note


def _history(row: PackageRow, ident: str) -> str:
    steps = "".join(
        f'<li>{_time(s.time)} {_state(s.state)} <span class="muted">attempt {s.attempt}</span></li>'
        for s in row.history
    )
    return (
        f'<details id="{ident}"><summary>{len(row.history)} step(s)</summary>'
        f"<ol>{steps}</ol></details>"
        f'<a class="json" href="{_e(package_url(row.blob_name))}">JSON</a>'
    )


def _packages(d: Dashboard, ids: _Ids) -> str:
    rows = (
        f'<tr class="package" data-state="{_e(r.state)}">'
        f'<td class="name">{_e(r.blob_name)}</td><td>{_state(r.state)}</td>'
        f'<td>{_reason_cell(r.reason_code)}</td><td class="num">{r.attempts}</td>'
        f"<td>{_time(r.updated)}</td>"
        f"<td>{'pending' if r.audit_pending else 'complete'}</td>"
        f"<td>{_history(r, ids[r])}</td></tr>"
        for r in d.packages
    )
    table = _table(
        ("package", "state", "reason", "#attempts", "updated", "audit", "history"),
        rows,
        "No package has a status yet.",
    )
    return (
        '<p class="filter"><label>Filter <input type="search" id="package-filter" '
        'autocomplete="off" placeholder="name, state or reason"></label> '
        f'<span class="muted"><span id="package-shown">{len(d.packages)}</span> of '
        f"{len(d.packages)} shown</span></p>{table}"
    )


def _section(ident: str, title: str, body: str, *, wide: bool = False) -> str:
    cls = ' class="wide"' if wide else ""
    return f'<section id="{ident}"{cls}><h2>{_e(title)}</h2>{body}</section>'


def _page(title: str, subtitle: str, body: str) -> str:
    a = assets()
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        f"<title>{_e(title)}</title><style>{a.css}</style></head>"
        f"<body><header><h1>{_e(title)}</h1><p>{subtitle}</p></header>"
        f"<main>{body}</main><script>{a.js}</script></body></html>"
    )


def render(d: Dashboard) -> str:
    """The whole page. Every value taken from ``d`` is escaped."""
    ids = _Ids(d.packages)
    body = "".join(
        (
            _section("states", "Packages by state", _tiles(d), wide=True),
            _section("imports", "Imports per day (UTC)", _chart(d.imports_per_day)),
            _section("drop-to-import", "Drop to import", _drop_to_import(d)),
            _section("refusals", "Refusals by reason code", _refusals(d)),
            _section("failures", "Failures", _failures(d, ids)),
            _section("waiting", "Waiting in the incoming container", _waiting(d)),
            _section("throttled", "Throttled by the HSM", _throttled(d, ids)),
            _section("audit", "Audit trail", _audit(d)),
            _section("metrics", "Metrics", _metrics(d)),
            _section("packages", "Packages", _packages(d, ids), wide=True),
        )
    )
    subtitle = (
        f"generated {_time(d.generated)} · {len(d.packages)} package(s) · "
        '<a href="/api/packages">JSON</a>'
    )
    return _page("BYOK imports", subtitle, body)


def render_error(message: str) -> str:
    """A page saying the dashboard could not be computed (storage down, not configured)."""
    return _page(
        "BYOK imports",
        "the dashboard is not available",
        _section("error", "Not available", f'<p class="bad">{_e(message)}</p>', wide=True),
    )
