"""The dashboard at ``/`` in a real headless Chromium (Debian's), against a real server.

Playwright drives the system browser: browser downloads cannot work here, and a
missing ``/usr/bin/chromium`` fails these tests (the README's test command
installs it).
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, expect, sync_playwright

from conftest import LiveServer, served, serving_several_tests_with_children, until

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


def _descendants() -> set[int]:
    return {process.pid for process in psutil.Process().children(recursive=True)}


def _keep_while_serving(before: set[int]) -> list[int]:
    """Exempt what started since ``before`` from the leftover check while it serves (a
    driver, a browser and its crash handlers, which leave the browser's tree for this
    process's, their subreaper): it is checked once it has ended."""
    started = sorted(_descendants() - before)
    for pid in started:
        serving_several_tests_with_children(pid)
    return started


@pytest.fixture(scope="module")
def driver() -> Iterator[Playwright]:
    """One Playwright driver per module: a thread may run only one at a time."""
    before = _descendants()
    with sync_playwright() as playwright:
        started = _keep_while_serving(before)
        yield playwright
    served(*started)


@pytest.fixture(scope="module")
def browser(driver: Playwright) -> Iterator[Browser]:
    """A browser per module, each test in a context of its own: launching Chromium costs
    a test about a second of CPU."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed: apt-get install chromium"
    before = _descendants()
    launched = driver.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
    started = _keep_while_serving(before)
    yield launched
    launched.close()
    served(*started)


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
def open_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    """Opens the dashboard of a server; a test fails if a page threw or logged an error
    (beyond the refusals of :data:`REFUSED`, and those of ``expected``)."""
    errors: list[str] = []
    contexts: list[BrowserContext] = []

    def open_on(server: LiveServer, expected: re.Pattern[str] = REFUSED) -> Page:
        # en-US, so numbers read "65,536" whatever the machine's locale.
        context = browser.new_context(locale="en-US", viewport={"width": 1280, "height": 900})
        contexts.append(context)
        opened = context.new_page()
        opened.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
        opened.on(
            "console",
            lambda message: (
                errors.append(f"console: {message.text}")
                if message.type == "error"
                and not REFUSED.match(message.text)
                and not expected.match(message.text)
                else None
            ),
        )
        opened.goto(server.url + "/")
        return opened

    yield open_on
    for context in contexts:
        context.close()
    assert errors == []


@pytest.fixture
def page(open_page: Callable[..., Page], server: LiveServer) -> Iterator[Page]:
    """The dashboard, opened; closed before its server stops, so it polls no stopped server."""
    opened = open_page(server)
    yield opened
    opened.close()


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
    # The last point is the rate just polled: 50 % (one hit, one miss), drawn at y 75.
    expect(page.locator("#hit-rate-line")).to_have_attribute(
        "points", re.compile(r"(^| )[0-9.]+,75\.0$")
    )
    # No empty output box before a run is followed.
    expect(page.locator("#live-output")).to_be_hidden()

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


def _ended(api: httpx.Client, job_id: str) -> dict[str, object]:
    job: dict[str, object] = until(
        lambda: (found := api.get(f"/api/jobs/{job_id}").json())["status"] != "running" and found,
        what="the job to end",
    )
    return job


def _background(api: httpx.Client, command: str, use_cache: bool = False) -> str:
    body = {"command": command, "use_cache": use_cache, "background": True}
    answer = api.post("/api/command", json=body)
    assert answer.status_code == 202
    job_id: str = answer.json()["job_id"]
    return job_id


def test_a_run_opens_in_a_detail_view_with_its_output_in_pages(
    page: Page, api: httpx.Client
) -> None:
    command = f"seq 1 30000; echo oops {uuid.uuid4().hex} >&2; exit 3"
    job_id = _background(api, command)
    _ended(api, job_id)
    pages = [
        api.get(f"/api/jobs/{job_id}/output", params={"offset": offset}).json()
        for offset in (0, 65536)
    ]
    _sign_in(page)
    page.locator(f"#recent tr[data-job-id='{job_id}'] td.command").click()
    detail = page.locator("#detail")
    expect(detail).to_be_visible()
    expect(page.locator("#detail-command")).to_have_text(command)
    facts = {"status": "failed", "exit": "3", "cached": "no"}
    for name, text in facts.items():
        expect(detail.locator(f"dd[data-fact='{name}']")).to_have_text(text)
    expect(detail.locator("dd[data-fact='started']")).to_have_text(re.compile(r"ago|just now"))
    expect(detail.locator("dd[data-fact='ended']")).to_have_text(re.compile(r"ago|just now"))
    stdout = page.locator("#detail-stdout")
    total = f"{pages[0]['total_bytes']:,}"
    expect(stdout.locator(".range")).to_have_text(f"bytes 0–65,536 of {total}")
    expect(stdout.locator("pre.data")).to_have_text(str(pages[0]["data"]))
    stdout.locator("button.next").click()
    expect(stdout.locator(".range")).to_have_text(f"bytes 65,536–131,072 of {total}")
    expect(stdout.locator("pre.data")).to_have_text(str(pages[1]["data"]))
    stdout.locator("button.last").click()
    expect(stdout.locator("pre.data")).to_contain_text("29999\n30000")
    expect(stdout.locator("button.next")).to_be_disabled()
    expect(page.locator("#detail-stderr pre.data")).to_contain_text("oops")
    page.click("#detail-close")
    expect(detail).to_be_hidden()


def test_an_entry_opens_in_a_detail_view(page: Page, api: httpx.Client) -> None:
    marker = uuid.uuid4().hex
    command = f"printf 'entry %s\\n' {marker}"
    assert api.post("/api/command", json={"command": command}).is_success
    _sign_in(page)
    page.locator("#entries tbody tr", has_text=marker).locator("td.command").click()
    detail = page.locator("#detail")
    expect(page.locator("#detail-title")).to_have_text("Cache entry")
    expect(page.locator("#detail-command")).to_have_text(command)
    expect(detail.locator("dd[data-fact='cached']")).to_have_text(re.compile("^yes"))
    expect(detail.locator("dd[data-fact='exit']")).to_have_text("0")
    expect(detail.locator("dd[data-fact='stored']")).to_have_text(re.compile(r"ago|just now"))
    expect(detail.locator("dd[data-fact='expires']")).to_have_text(re.compile(r"^in \d+ min$"))
    expect(page.locator("#detail-stdout pre.data")).to_have_text(f"entry {marker}\n")
    expect(page.locator("#detail-stderr .empty")).to_have_text("Nothing on stderr.")
    expect(page.locator("#detail-stderr pre.data")).to_be_hidden()


def test_runs_are_filtered_marked_as_cached_timed_and_paged(
    page: Page, api: httpx.Client, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex
    hit = f"echo hit {marker}"
    assert api.post("/api/command", json={"command": hit}).is_success  # the miss that runs
    cached = [_background(api, hit, use_cache=True) for _ in range(20)]  # 20 hits
    failed = _ended(api, _background(api, f"echo {marker}; exit 4"))["job_id"]
    gate = tmp_path / "gate"
    running = _background(api, f"while [ ! -e {gate} ]; do sleep 0.05; done")
    total = len(api.get("/api/jobs").json()["jobs"])
    assert total == 23
    _sign_in(page)
    rows = page.locator("#recent tbody tr")
    expect(rows).to_have_count(20)
    expect(page.locator("#runs-page")).to_have_text(f"1–20 of {total}")
    expect(rows.first.locator("td.started")).to_have_text(re.compile(r"^(just now|\d+ s ago)$"))
    page.click("#runs-next")
    expect(page.locator("#runs-page")).to_have_text(f"21–{total} of {total}")
    expect(rows).to_have_count(total - 20)
    page.click("#filter-cached")
    expect(rows).to_have_count(20)
    expect(page.locator("#recent tbody tr .badge.cached")).to_have_count(20)
    expect(page.locator(f"#recent tr[data-job-id='{cached[0]}']")).to_have_count(1)
    page.click("#filter-failed")
    expect(rows).to_have_count(1)
    expect(page.locator(f"#recent tr[data-job-id='{failed}'] td.exit")).to_have_text("4")
    expect(page.locator("#recent .badge.cached")).to_have_count(0)
    page.click("#filter-running")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-job-id", running)
    gate.touch()
    expect(rows).to_have_count(0)
    # A hit opens as cached, with the original run's time.
    page.click("#filter-cached")
    page.locator(f"#recent tr[data-job-id='{cached[0]}']").click()
    expect(page.locator("#detail dd[data-fact='cached']")).to_have_text(re.compile("^yes"))
    expect(page.locator("#detail-stdout pre.data")).to_have_text(f"hit {marker}\n")


def test_the_chart_has_axes_and_the_history_from_before_the_page_opened(
    page: Page, api: httpx.Client
) -> None:
    for _ in range(2):  # a miss, then a hit
        assert api.post("/api/command", json={"command": "echo charted"}).is_success
    until(
        lambda: any(s["hits"] for s in api.get("/api/cache/history").json()["samples"]),
        seconds=20,
        what="the server to sample the hit",
    )
    signed_in_at = time.time()  # the page reads nothing before this
    _sign_in(page)
    graph = page.locator("#hit-rate-graph")
    expect(graph.locator(".axis-y text")).to_have_text(["0 %", "25 %", "50 %", "75 %", "100 %"])
    expect(graph.locator(".axis-x text").last).to_have_text("now")
    # The last point sampled (the server's) and the one just polled, both at 50 %.
    expect(page.locator("#hit-rate-line")).to_have_attribute(
        "points", re.compile(r"(^| )[0-9.]+,75\.0 [0-9.]+,75\.0$")
    )
    since = float(graph.get_attribute("data-since") or "inf")
    assert since < signed_in_at  # the chart starts before the page read anything


def test_slots_queue_and_store_are_shown(
    live_server_factory: Callable[..., LiveServer],
    open_page: Callable[..., Page],
    tmp_path: Path,
) -> None:
    server = live_server_factory(
        "--max-concurrent", "1", env={"RUNCACHE_TOKEN": TOKEN, "RUNCACHE_ADMIN_TOKEN": ADMIN}
    )
    page = open_page(server)
    gate = tmp_path / "gate"
    with httpx.Client(
        base_url=server.url, timeout=15, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as api:
        for n in range(2):
            _background(api, f"while [ ! -e {gate} ]; do sleep 0.05; done; echo {n}")
        store = api.get("/health").json()["store"]
        _sign_in(page)
        expect(page.locator("#slots")).to_have_text("1 / 1")
        expect(page.locator("#queue")).to_have_text("1")
        expect(page.locator("#store")).to_have_text(store)
        expect(page.locator("#store-state")).to_have_text("ok")
        gate.touch()
        expect(page.locator("#slots")).to_have_text("0 / 1")
        expect(page.locator("#queue")).to_have_text("0")


def test_commands_never_wrap_inside_a_word(page: Page, api: httpx.Client) -> None:
    command = "echo " + "long" * 80 + " " + uuid.uuid4().hex
    assert api.post("/api/command", json={"command": command}).is_success
    _sign_in(page)
    shown = page.locator("#entries td.command", has_text=command[-32:])
    expect(shown).to_have_count(1)
    style = shown.evaluate(
        "cell => [getComputedStyle(cell).whiteSpace, getComputedStyle(cell).textOverflow,"
        " getComputedStyle(cell).wordBreak, cell.scrollWidth > cell.clientWidth, cell.title]"
    )
    assert style == ["nowrap", "ellipsis", "normal", True, command]  # cut, whole on hover
    shown.click()
    expect(page.locator("#detail-command")).to_have_text(command)
    assert page.locator("#detail-command").evaluate("e => getComputedStyle(e).whiteSpace") == "pre"


def test_a_failing_store_is_shown_with_its_reason(
    live_server_factory: Callable[..., LiveServer],
    open_page: Callable[..., Page],
    tmp_path: Path,
) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"not a database at all" * 200)
    server = live_server_factory(
        "--store",
        f"sqlite://{corrupt}",
        env={"RUNCACHE_TOKEN": TOKEN, "RUNCACHE_ADMIN_TOKEN": ADMIN},
    )
    # The entries cannot be listed while the store fails: a 503, which the page reports.
    page = open_page(server, re.compile(r"^Failed to load resource: .* status of 503"))
    with httpx.Client(
        base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as api:
        assert api.post("/api/command", json={"command": "echo uncached"}).is_success
        health = until(
            lambda: (found := api.get("/health").json())["status"] == "degraded" and found,
            seconds=30,
            what="the server to find its store failing",
        )
    expect(page.locator("#message")).to_contain_text("needs a token")
    page.fill("#token", TOKEN)
    page.click("#use-token")
    expect(page.locator("#health")).to_contain_text("degraded")
    expect(page.locator("#store-state")).to_have_text("failing")
    expect(page.locator("#store-problem")).to_contain_text(str(health["reason"]))


def test_entries_are_paged(page: Page, api: httpx.Client) -> None:
    marker = uuid.uuid4().hex
    for n in range(25):
        assert api.post("/api/command", json={"command": f"echo {marker} {n}"}).is_success
    _sign_in(page)
    page.fill("#entry-search", f"echo {marker}")
    rows = page.locator("#entries tbody tr")
    expect(rows).to_have_count(20)
    expect(page.locator("#entries-page")).to_have_text("1–20")
    expect(rows.first.locator("td.command")).to_have_text(f"echo {marker} 24")  # newest first
    page.click("#entries-next")
    expect(rows).to_have_count(5)
    expect(page.locator("#entries-page")).to_have_text("21–25")
    expect(page.locator("#entries-next")).to_be_disabled()
    expect(rows.last.locator("td.command")).to_have_text(f"echo {marker} 0")
    page.click("#entries-prev")
    expect(rows).to_have_count(20)
    expect(page.locator("#entries-prev")).to_be_disabled()
