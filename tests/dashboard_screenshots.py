"""The dashboard's screenshots in the docs, taken in Debian's Chromium against a real server.

Run from the checkout, in the test environment: ``python tests/dashboard_screenshots.py``.
It starts ``runcache serve`` on a free port, runs a few commands over a minute (so the
hit-rate chart has history to draw), and writes ``docs/images/dashboard*.png``.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import Page, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_dashboard import CHROMIUM_ARGS  # noqa: E402

from conftest import LiveServer, start_server, until  # noqa: E402

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"

#: Rounds of requests, one per sample the server keeps (every 5 s): the chart's history.
ROUNDS = 12

BUILD = (
    "sh -c 'echo compiling src/; sleep 0.3; echo \"src/main.c:42: error: expected ;\" >&2; exit 1'"
)
LONG = (
    "find /usr/share/doc -maxdepth 2 -name copyright -newer /etc/hostname -print "
    "| sort | head -n 50"
)
COMMANDS = ("seq 1 20000", "uname -sr", "date -u +%F", "ls /usr/share/doc", LONG)


def _populate(api: httpx.Client) -> None:
    """Misses at first, then more and more hits: a hit rate that climbs."""
    for round_ in range(ROUNDS):
        command = COMMANDS[round_ % len(COMMANDS)] if round_ < len(COMMANDS) else COMMANDS[0]
        for _ in range(round_ + 1):
            api.post("/api/command", json={"command": command})
        if round_ == 3:
            api.post("/api/command", json={"command": BUILD, "use_cache": False})
        time.sleep(5)
    api.post("/api/command", json={"command": "uname -sr", "background": True})
    steps = 'for i in $(seq 1 600); do echo "step $i of 600"; sleep 0.5; done'
    api.post("/api/command", json={"command": steps, "background": True, "use_cache": False})


def _shoot(page: Page, name: str) -> None:
    page.wait_for_timeout(500)  # the last poll drawn
    page.screenshot(path=str(IMAGES / name), full_page=name == "dashboard.png")
    print("wrote", IMAGES / name)


def main() -> None:
    server: LiveServer = start_server()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed: apt-get install chromium"
    IMAGES.mkdir(parents=True, exist_ok=True)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as api:
            _populate(api)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(locale="en-US", viewport={"width": 1280, "height": 900})
            page.goto(server.url + "/")
            page.locator("#running button.follow").first.click()
            until(lambda: "step 4 " in page.locator("#live-output").inner_text())
            _shoot(page, "dashboard.png")
            page.locator("#recent tbody tr", has_text="compiling").first.click()
            page.locator("#detail-stderr pre.data").wait_for()
            _shoot(page, "dashboard-run.png")
            page.click("#detail-close")
            page.locator("#entries tbody tr", has_text="seq 1 20000").first.click()
            page.locator("#detail-stdout pre.data").wait_for()
            page.locator("#detail-stdout button.next").click()
            page.wait_for_function("!document.querySelector('#detail-stdout .first').disabled")
            _shoot(page, "dashboard-entry.png")
            browser.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
