"""Pages of other origins against a real ``runcache serve``, in Debian's real Chromium.

A second HTTP server on another free port serves the attacker's page; Chromium
opens it, and the page does what any site could: a ``no-cors`` fetch and a
``text/plain`` form that run ``touch``, a clear, a read of ``/api/jobs``. DNS
rebinding is played in the browser too: Chromium resolves ``evil.example`` to
127.0.0.1 (``--host-resolver-rules``), and the attacker's page is what the first
lookup gave (served by playwright's routing), so its later requests reach runcache
as the page's own origin. Nothing may run, clear or be read.
"""

from __future__ import annotations

import http.client
import http.server
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, Playwright, Route

from test_dashboard import CHROMIUM_ARGS, browser, driver  # noqa: F401 - the fixtures

from conftest import LiveServer, free_port

ATTACK = """<!doctype html><html><body>
<iframe name="sink"></iframe>
<form id="form" method="post" enctype="text/plain" target="sink" action="{target}/api/command">
<input name='{{"command": "touch {form_file}; echo ' value='"}}'></form>
<script>
const target = "{target}";
const sink = document.querySelector("iframe");
sink.addEventListener("load", () => {{
  try {{ window.formDone = sink.contentWindow.location.href !== "about:blank"; }}
  catch (e) {{ window.formDone = true; }}  // another origin's answer
}});
document.getElementById("form").submit();
async function attack() {{
  const outcome = {{}};
  const command = JSON.stringify({{command: "touch {fetch_file}", use_cache: false}});
  try {{
    await fetch(target + "/api/command", {{method: "POST", mode: "no-cors",
      headers: {{"Content-Type": "text/plain"}}, body: command}});
    await fetch(target + "/api/cache/clear", {{method: "POST", mode: "no-cors"}});
    outcome.sent = true;
  }} catch (e) {{ outcome.sent = String(e); }}
  try {{
    const jobs = await fetch(target + "/api/jobs");
    outcome.jobs = jobs.status + " " + await jobs.text();
  }} catch (e) {{ outcome.jobs = "unreadable: " + e; }}
  window.outcome = outcome;
}}
attack();
</script></body></html>"""


@pytest.fixture
def attacker() -> Iterator[Callable[[str], str]]:
    """An HTTP server on another free loopback port: ``serve(html)`` gives the page's path."""
    pages: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = pages.get(self.path, b"")
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def serve(html: str) -> str:
        path = f"/{uuid.uuid4().hex}.html"
        pages[path] = html.encode()
        return f":{server.server_address[1]}{path}"

    yield serve
    server.shutdown()
    server.server_close()
    thread.join(10)


def _seed(api: httpx.Client) -> int:
    """One cached entry, through a client without Origin; the commands run so far."""
    assert api.post("/api/command", json={"command": "echo seeded"}).json()["success"]
    executed: int = api.get("/api/telemetry").json()["commands_executed"]
    return executed


def _attack(page: Page, url: str) -> dict[str, object]:
    page.goto(url)
    page.wait_for_function("window.outcome && window.formDone", timeout=20_000)
    outcome: dict[str, object] = page.evaluate("window.outcome")
    return outcome


def _nothing_happened(api: httpx.Client, executed: int, *files: Path) -> None:
    for file in files:
        assert not file.exists(), f"{file.name} was created: a foreign page ran a command"
    assert api.get("/api/telemetry").json()["commands_executed"] == executed
    assert not [job for job in api.get("/api/jobs").json()["jobs"] if "touch" in job["command"]]
    assert api.get("/api/cache/stats").json()["size"] == 1, "a foreign page cleared the cache"


@pytest.mark.parametrize(
    "page_host", ["localhost", "127.0.0.1"], ids=["cross-site", "same-site-other-port"]
)
def test_a_page_of_another_origin_runs_clears_and_reads_nothing(
    browser: Browser,  # noqa: F811 - the fixture
    live_server: LiveServer,
    attacker: Callable[[str], str],
    tmp_path: Path,
    page_host: str,
) -> None:
    fetch_file, form_file = tmp_path / "by-fetch", tmp_path / "by-form"
    with httpx.Client(base_url=live_server.url, timeout=15) as api:
        executed = _seed(api)
        html = ATTACK.format(target=live_server.url, fetch_file=fetch_file, form_file=form_file)
        context = browser.new_context()
        try:
            outcome = _attack(context.new_page(), f"http://{page_host}{attacker(html)}")
        finally:
            context.close()
        assert outcome["sent"] is True  # the requests left the browser
        assert "seeded" not in str(outcome["jobs"])
        _nothing_happened(api, executed, fetch_file, form_file)


@pytest.fixture
def rebinding_browser(driver: Playwright) -> Iterator[Browser]:  # noqa: F811 - the fixture
    """Chromium whose resolver answers 127.0.0.1 for evil.example: the rebound name.

    The page playwright serves counts as a public one, which Chromium's own Local
    Network Access checks keep from fetching a loopback address (so the fetches fail
    before they leave, old code or new): those checks are off here, so the test is
    of runcache's guard, as it must hold in browsers without them (Firefox, older
    Chromium, a user who granted a site local network access)."""
    launched = driver.chromium.launch(
        executable_path="/usr/bin/chromium",
        args=[
            *CHROMIUM_ARGS,
            "--host-resolver-rules=MAP evil.example 127.0.0.1",
            "--disable-features=LocalNetworkAccessChecks,BlockInsecurePrivateNetworkRequests,"
            "PrivateNetworkAccessSendPreflights",
        ],
    )
    yield launched
    launched.close()


def test_dns_rebinding_in_the_browser_runs_and_reads_nothing(
    rebinding_browser: Browser, live_server: LiveServer, tmp_path: Path
) -> None:
    fetch_file, form_file = tmp_path / "by-fetch", tmp_path / "by-form"
    port = live_server.url.rsplit(":", 1)[1]
    origin = f"http://evil.example:{port}"
    with httpx.Client(base_url=live_server.url, timeout=15) as api:
        executed = _seed(api)
        html = ATTACK.format(target=origin, fetch_file=fetch_file, form_file=form_file)
        context = rebinding_browser.new_context()
        try:
            page = context.new_page()
            # The first answer for evil.example was the attacker's: its page.
            page.route(f"{origin}/attack.html", partial(_fulfil, html))
            outcome = _attack(page, f"{origin}/attack.html")
        finally:
            context.close()
        assert str(outcome["jobs"]).startswith("403 "), outcome  # the same origin, yet refused
        assert "seeded" not in str(outcome["jobs"])
        _nothing_happened(api, executed, fetch_file, form_file)


def _fulfil(html: str, route: Route) -> None:
    route.fulfill(status=200, content_type="text/html; charset=utf-8", body=html)


@pytest.mark.parametrize("path", ["/api/jobs", "/mcp", "/metrics", "/health", "/"])
def test_a_request_with_a_rebound_host_is_refused(live_server: LiveServer, path: str) -> None:
    port = int(live_server.url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        connection.request("GET", path, headers={"Host": f"evil.example:{port}"})
        response = connection.getresponse()
        body = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 403
    assert "--allowed-hosts" in body["error"] and "evil.example" in body["error"]
    live_server.logged(lambda line: "refused GET" in line and "evil.example" in line)


def test_allowed_hosts_admits_a_name_on_a_real_server(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory("--allowed-hosts", "runcache.example")
    port = server.url.rsplit(":", 1)[1]
    admitted = httpx.get(
        f"{server.url}/api/jobs", headers={"Host": f"runcache.example:{port}"}, timeout=15
    )
    assert admitted.status_code == 200
    refused = httpx.get(
        f"{server.url}/api/jobs", headers={"Host": f"evil.example:{port}"}, timeout=15
    )
    assert refused.status_code == 403
