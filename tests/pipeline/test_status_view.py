"""The people's views of status documents (byok_pipeline/cli/status_view.py): pure functions."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

from byok_pipeline.cli import status_view as view
from byok_pipeline.core.status import StatusDoc, utc

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _doc(name: str, state: str, minutes_ago: int, reason: str | None = None) -> StatusDoc:
    doc = StatusDoc(blob_name=name, package_sha256="ab" * 32, etag='"e"', correlation_id="c")
    doc.drop_time = utc(NOW - timedelta(minutes=minutes_ago))
    doc.advance("received", NOW - timedelta(minutes=minutes_ago))
    path = {"imported": ["validated", "importing", "imported"]}.get(state, [state])
    for step in path if state != "received" else []:
        doc.advance(step, NOW)
    doc.reason_code = reason
    doc.attempts = 1
    return doc


def test_rows_are_oldest_first_and_waiting_blobs_without_a_record_are_listed() -> None:
    docs = [_doc("b.byok", "imported", 5), _doc("a.byok", "rejected", 50, "bad_metadata")]
    waiting = [("c.byok", NOW - timedelta(minutes=1)), ("b.byok", NOW - timedelta(minutes=5))]
    listed = view.rows(docs, waiting)
    assert [(r.name, r.state) for r in listed] == [
        ("a.byok", "rejected"), ("b.byok", "imported"), ("c.byok", "waiting"),
    ]  # fmt: skip  # b.byok has a record: it is not listed twice
    assert [r.name for r in view.rows(docs, waiting, state="waiting")] == ["c.byok"]


def test_table_fits_100_columns_and_escapes_hostile_names() -> None:
    hostile = "x" * 30 + "\x1b[31m\nline\t" + "y" * 200 + ".byok"
    listed = view.rows([_doc(hostile, "rejected", 3, "verification_error")], [])
    text = view.table(listed, NOW, 5)
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "\x1b" not in text
    assert "\n" not in text.splitlines()[1]
    assert text.splitlines()[-1] == "1 package: 1 rejected"
    assert view.age(NOW - timedelta(hours=3, minutes=5), NOW) == "3h"


def test_colour_only_on_a_terminal_without_no_color() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert view.use_colour(Tty(), {})
    assert not view.use_colour(Tty(), {"NO_COLOR": ""})
    assert not view.use_colour(io.StringIO(), {})
    listed = view.rows([_doc("a.byok", "failed", 1, "attempts_exhausted")], [])
    assert "\033[31;1m" in view.table(listed, NOW, 5, colour=True)
    assert "\033[" not in view.table(listed, NOW, 5, colour=False)


def test_detail_shows_history_message_and_what_to_do() -> None:
    doc = _doc("k.byok", "rejected", 2, "kek_expired")
    doc.message = "the KEK expired"
    text = view.detail(doc, NOW, 5)
    assert text.splitlines()[0] == "k.byok: rejected [kek_expired]"
    assert "received            attempt 0  (2m ago)" in text
    assert "message: the KEK expired" in text
    assert "what to do: The KEK's exp (expiry) has passed." in text
