"""The dashboard as a person sees it: packages processed against Azurite and the emulator
(imported, refused, one waiting, one throttled, two hostile names), the README's `byok serve`
started as a subprocess, and the page rendered by headless Chromium (Debian's, driven by
Playwright). Assertions are on the rendered DOM; a screenshot goes to artifacts/dashboard.png.
"""

from __future__ import annotations

import os
import re
import selectors
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

import pytest
from pipeline_support import Stack
from testsupport import REPO

pytestmark = pytest.mark.azurite

MARKER = "# dashboard"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = REPO / "artifacts" / "dashboard.png"
HOSTILE = "<img src=x onerror=alert(1)>.byok"
HOSTILE_WAITING = '"><script>alert(2)</script>.byok'
BYOK = Path(sys.executable).with_name("byok")


def readme_commands() -> list[list[str]]:
    """The commands of the README's Dashboard block, ``byok`` resolved to this virtualenv's."""
    text = (REPO / "README.md").read_text()
    block = text.split(MARKER + "\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    commands = [shlex.split(line) for line in lines]
    assert all(c[0] == "byok" for c in commands), commands
    return [[str(BYOK), *c[1:]] for c in commands]


def serve_env(stack: Stack) -> dict[str, str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("BYOK_", "APPLICATIONINSIGHTS_"))
    }
    return {**clean, **stack.env(), "BYOK_KEK_KID": stack.kek_kid}


class Served:
    """A running ``byok serve`` subprocess and the URL it printed."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout=60)
        line = self.proc.stdout.readline() if ready else ""
        self.line = line
        found = re.search(r"http://127\.0\.0\.1:\d+/", line)
        if found is None:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            pytest.fail(f"byok serve printed no URL: {line!r} {err!r}")
        self.url = found.group(0)

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C: (exit code, stderr)."""
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)


@pytest.fixture
def processed(stack: Stack) -> Stack:
    """Two imported, two refused (one under a hostile name), one throttled by the HSM (still in
    incoming, its record in ``importing``), two never delivered (one with a hostile name)."""
    for type_name in ("ec-p256", "oct-256"):
        pkg = stack.package(type_name, f"dash-{type_name}")
        stack.drop_package(pkg)
        assert stack.deliver(pkg.name).state == "imported"
    stack.drop("dash-bad.byok", b"garbage")
    assert stack.deliver("dash-bad.byok").reason_code == "malformed_package"
    stack.drop(HOSTILE, b"{}")
    assert stack.deliver(HOSTILE).reason_code == "bad_key_name"

    slow = stack.package("ec-p256", "dash-throttled")
    stack.drop_package(slow)
    stack.deliver_throttled(slow)

    waiting = stack.package("ec-p384", "dash-waiting")
    stack.drop_package(waiting)
    stack.drop(HOSTILE_WAITING, b"{}")
    return stack


def test_the_dashboard_renders_in_chromium(processed: Stack) -> None:
    """One browser launch: counts per state, reasons, waiting and throttled packages, the hostile
    names shown as text and never run, the page's own script and style allowed by the policy and
    nothing else fetched; the README's `byok serve` stops on Ctrl-C with exit 130."""
    from playwright.sync_api import Dialog, sync_playwright

    stack = processed
    help_cmd, serve_cmd = readme_commands()
    env = serve_env(stack)
    shown = subprocess.run(help_cmd, env=env, capture_output=True, text=True, check=False)
    assert shown.returncode == 0, shown.stderr
    for phrase in ("--port", "--host", "Ctrl-C", "/api/dashboard"):
        assert phrase in shown.stdout
    served = Served([*serve_cmd, "--port", "0"], env)  # any free port: runs never collide
    try:
        url = served.url
        with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
            context = p.chromium.launch_persistent_context(
                profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
            )
            try:
                page = context.new_page()
                dialogs: list[str] = []
                console: list[str] = []
                requested: list[str] = []
                errors: list[str] = []

                def on_dialog(dialog: Dialog) -> None:  # an alert() that ran: must never happen
                    dialogs.append(dialog.message)
                    dialog.dismiss()

                page.on("dialog", on_dialog)
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
                page.on("request", lambda r: requested.append(r.url))
                response = page.goto(url, wait_until="load")
                assert response is not None
                assert response.status == 200
                assert "script-src 'sha256-" in response.headers["content-security-policy"]
                page.wait_for_timeout(300)  # any handler an injected element had would have run

                counts = page.eval_on_selector_all(
                    ".tile[data-state]",
                    "els => Object.fromEntries(els.map(e => "
                    "[e.dataset.state, Number(e.querySelector('.count').textContent)]))",
                )
                assert {k: counts[k] for k in ("imported", "rejected", "importing")} == {
                    "imported": 2,
                    "rejected": 2,
                    "importing": 1,
                }
                assert (counts["waiting"], counts["throttled"], counts["failed"]) == (3, 1, 0)
                reasons = page.eval_on_selector_all(
                    "#refusals tr[data-reason]",
                    "els => Object.fromEntries(els.map(e => "
                    "[e.dataset.reason, Number(e.querySelector('td.num').textContent)]))",
                )
                assert reasons == {"bad_key_name": 1, "malformed_package": 1}
                waiting = page.eval_on_selector_all(
                    "#waiting tr.waiting", "els => els.map(e => e.dataset.blob)"
                )
                assert sorted(waiting) == sorted(
                    [HOSTILE_WAITING, "dash-throttled.byok", "dash-waiting.byok"]
                )
                throttled = page.locator("#throttled tr.throttled")
                assert throttled.count() == 1
                assert "dash-throttled.byok" in throttled.inner_text()
                assert "importing" in throttled.inner_text()
                assert "intact" in page.inner_text('[data-metric="trail"]')

                # hostile names: text on the page, never markup, never run
                assert page.get_by_text(HOSTILE, exact=True).count() >= 1
                assert page.get_by_text(HOSTILE_WAITING, exact=True).count() == 1
                assert page.locator("img").count() == 0
                assert page.locator("script").count() == 1
                assert dialogs == []
                # the page's own script ran and its style applied: the policy allowed them
                assert page.get_attribute("html", "data-js") == "on"
                assert page.eval_on_selector(".tiles", "e => getComputedStyle(e).display") == "flex"
                assert not [m for m in console if "Content Security Policy" in m], console
                assert errors == []
                assert requested == [url]  # nothing else was fetched

                SCREENSHOT.parent.mkdir(exist_ok=True)
                page.screenshot(path=str(SCREENSHOT), full_page=True)
                print(f"dashboard screenshot: {SCREENSHOT}")

                # a state tile lists only its packages; a history link opens that history
                page.click('.tile[data-state="rejected"]')
                assert page.locator("tr.package:visible").count() == 2
                assert page.inner_text("#package-shown") == "2"
                page.click('.tile[data-state="rejected"]')
                assert page.locator("tr.package:visible").count() == 5
                target = page.get_attribute("#throttled tr.throttled a", "href")
                assert target is not None
                assert target.startswith("#pkg-")
                page.click("#throttled tr.throttled a")
                assert page.eval_on_selector(target, "e => e.open") is True
                # the JSON link of a hostile name reaches that package
                link = page.locator("tr.package", has_text=HOSTILE).locator("a.json")
                href = link.get_attribute("href")
                assert href == "/api/packages/" + quote(HOSTILE, safe="")
                answer = page.request.get(url.rstrip("/") + href)
                assert answer.status == 200
                assert answer.json()["reason_code"] == "bad_key_name"
                assert answer.json()["blob_name"] == HOSTILE
                assert dialogs == []
            finally:
                context.close()
        code, err = served.interrupt()
        assert code == 130, err
        assert "Traceback" not in err
    finally:
        served.kill()


def test_a_port_in_use_is_one_line(stack: Stack) -> None:
    """A second server on the first one's port: one line, exit 1; the first (started with
    --json: one JSON line saying where) keeps serving and stops on Ctrl-C."""
    import json
    import urllib.request

    env = serve_env(stack)
    first = Served([str(BYOK), "serve", "--port", "0", "--json", "--no-verify-trail"], env)
    try:
        assert json.loads(first.line)["api"] == f"{first.url}api/packages"
        port = int(first.url.rsplit(":", 1)[1].rstrip("/"))
        second = subprocess.run(
            [str(BYOK), "serve", "--port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            (
                f"byok: failed [port_in_use]: port {port} on 127.0.0.1 is already in use: stop "
                "what uses it or pick another with --port N (0: any free port)"
            )
        ]
        assert second.stdout == ""
        with urllib.request.urlopen(f"{first.url}api/packages", timeout=30) as answer:  # noqa: S310  # the loopback URL it printed
            assert json.loads(answer.read())["count"] == 0
        code, err = first.interrupt()
        assert code == 130, err
        assert "Traceback" not in err
    finally:
        first.kill()
