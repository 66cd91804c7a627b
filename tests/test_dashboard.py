"""The dashboard at ``/`` in a real headless Chromium (Debian's), against a real server.

Playwright drives the system browser: browser downloads cannot work here, and a
missing ``/usr/bin/chromium`` fails these tests (the README's test command
installs it).
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from conftest import LiveServer

TOKEN, ADMIN = "t" * 32, "a" * 32

#: Flags for a browser in a closed network: no background connections to Google's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser() -> Iterator[Browser]:
    """A browser per test: the suite checks that a test leaves no process behind."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed: apt-get install chromium"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def server(live_server_factory: Callable[..., LiveServer]) -> LiveServer:
    started: LiveServer = live_server_factory(
        env={"RUNCACHE_TOKEN": TOKEN, "RUNCACHE_ADMIN_TOKEN": ADMIN}
    )
    return started


@pytest.fixture
def api(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.url, timeout=15, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as client:
        yield client


#: What Chromium logs for an answer of 401 or 403, which these tests ask for on purpose.
REFUSED = re.compile(r"^Failed to load resource: the server responded with a status of 40[13]")


@pytest.fixture
def page(browser: Browser, server: LiveServer) -> Iterator[Page]:
    """The dashboard, opened; a test fails if the page threw or logged an error."""
    context = browser.new_context()
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
    opened.on(
        "console",
        lambda message: (
            errors.append(f"console: {message.text}")
            if message.type == "error" and not REFUSED.match(message.text)
            else None
        ),
    )
    opened.goto(server.url + "/")
    yield opened
    context.close()
    assert errors == []


def _sign_in(page: Page) -> None:
    expect(page.locator("#message")).to_contain_text("needs a token")
    page.fill("#token", TOKEN)
    page.click("#use-token")
    expect(page.locator("#health")).to_contain_text("healthy")


def test_the_page_is_served_open_with_a_strict_policy(server: LiveServer) -> None:
    response = httpx.get(server.url + "/", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy
    assert "unsafe-inline" not in policy and "connect-src 'self'" in policy
    assert "<script>" in response.text  # everything it needs is in the page: no CDN
    assert "http://" not in response.text and "https://" not in response.text


def test_the_page_shows_the_api_numbers_and_follows_and_cancels_a_run(
    page: Page, api: httpx.Client, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex
    for _ in range(2):  # a miss that runs, then a hit
        assert api.post("/api/command", json={"command": f"echo cached {marker}"}).is_success
    gate = tmp_path / "gate"
    running = api.post(
        "/api/command",
        json={
            "command": f"echo first {marker}; "
            f"while [ ! -e {gate} ]; do sleep 0.05; done; echo never",
            "use_cache": False,
            "background": True,
        },
    ).json()
    _sign_in(page)
    stats = api.get("/api/cache/stats").json()
    for field in ("hits", "misses", "size", "bytes", "hit_rate"):
        expect(page.locator(f"#stat-{field.replace('_', '-')}")).to_have_text(str(stats[field]))
    # One point every 2 s from the page's first poll: on a busy machine there may be more by
    # now, every one at 50 % (one hit, one miss).
    expect(page.locator("#hit-rate-line")).to_have_attribute(
        "points", re.compile(r"^0\.0,50\.0( [0-9.]+,50\.0)*$")
    )

    row = page.locator(f"#running tr[data-job-id='{running['job_id']}']")
    row.locator("button.follow").click()
    # Printed while the command still waits on its gate: the output is live.
    expect(page.locator("#live-output")).to_contain_text(f"first {marker}")
    assert api.get(f"/api/jobs/{running['job_id']}").json()["status"] == "running"
    row.locator("button.cancel").click()
    expect(page.locator("#live-output")).to_contain_text("[cancelled]")
    assert api.get(f"/api/jobs/{running['job_id']}").json()["status"] == "cancelled"
    recent = page.locator(f"#recent tr[data-job-id='{running['job_id']}'] td.status")
    expect(recent).to_have_text("cancelled")


def test_entries_are_searched_and_deleted_with_the_admin_token(
    page: Page, api: httpx.Client
) -> None:
    marker = uuid.uuid4().hex
    kept, dropped = f"echo keep {marker}", f"echo drop {marker}"
    for command in (kept, dropped, "echo other"):
        assert api.post("/api/command", json={"command": command}).is_success
    _sign_in(page)
    page.fill("#entry-search", "echo drop")
    rows = page.locator("#entries tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first.locator("td.command")).to_have_text(dropped)
    rows.first.locator("button.delete").click()  # with the plain token: refused
    expect(page.locator("#message")).to_contain_text("needs the admin token")
    page.fill("#admin-token", ADMIN)
    page.click("#clear-cancel")
    page.locator("#entries tbody tr button.delete").first.click()
    expect(page.locator("#message")).to_contain_text("deleted")
    expect(rows).to_have_count(0)
    commands = [entry["command"] for entry in api.get("/api/cache/entries").json()["entries"]]
    assert kept in commands and dropped not in commands


def test_clear_asks_for_the_admin_token(page: Page, api: httpx.Client) -> None:
    assert api.post("/api/command", json={"command": "echo to clear"}).is_success
    _sign_in(page)
    expect(page.locator("#stat-size")).not_to_have_text("0")
    page.click("#clear-cache")
    page.fill("#admin-token", TOKEN)  # the plain token: not enough
    page.click("#clear-confirm")
    expect(page.locator("#message")).to_contain_text("needs the admin token")
    assert api.get("/api/cache/stats").json()["size"] > 0
    page.fill("#admin-token", ADMIN)
    page.click("#clear-confirm")
    expect(page.locator("#message")).to_contain_text("Cache cleared")
    expect(page.locator("#stat-size")).to_have_text("0")
    assert api.get("/api/cache/stats").json()["size"] == 0


def test_a_command_is_shown_as_text_never_run_as_markup(page: Page, api: httpx.Client) -> None:
    command = "echo '<img src=x onerror=\"document.title=1\">' # " + uuid.uuid4().hex
    assert api.post("/api/command", json={"command": command}).is_success
    _sign_in(page)
    expect(page.locator("#entries td.command", has_text="<img src=x")).to_have_count(1)
    assert page.title() == "runcache"
    assert page.locator("#entries img").count() == 0
