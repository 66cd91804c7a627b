"""Debian's nginx as the load balancer in front of real ``runcache serve`` processes.

:func:`start_nginx` writes the configuration that docs/team.md ("Run it for a team")
shows (round-robin over the servers, kept-alive HTTP/1.1 connections to
them, no buffering for event streams, long read timeouts, the client's ``Host``
passed through) into a directory of the test's, and runs nginx in the
foreground there: its pid file, temporary files and logs all stay in that
directory, so nothing of the machine's nginx is touched. The access log names
the server each request went to (``$upstream_addr``), so a test can tell that
both servers answered.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from conftest import free_port, until

#: The part of the configuration a team deploys, with the servers' addresses
#: (``{servers}``), the address nginx listens on and its name filled in; docs/team.md
#: shows the same (a test checks it).
SITE = """\
upstream runcache {{
{servers}
    keepalive 32;
}}

server {{
    listen {listen};
    server_name {name};
    client_max_body_size 2m;

    location / {{
        proxy_pass http://runcache;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_buffering off;
        proxy_request_buffering off;
        proxy_read_timeout 3700s;
        proxy_send_timeout 3700s;
    }}
}}
"""

#: What the test adds around it: everything inside ``{prefix}``, one worker.
_MAIN = """\
{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 512;
}}

http {{
    log_format balanced '$request_method $uri $status $upstream_addr';
    access_log {prefix}/access.log balanced;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

{site}
}}
"""


@dataclass
class Nginx:
    """An nginx process balancing over some servers, and where it logs."""

    process: subprocess.Popen[bytes]
    port: int
    prefix: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def upstreams(self, path: str) -> list[str]:
        """The server (``host:port``) each logged request for ``path`` went to, in order."""
        found = []
        for line in (self.prefix / "access.log").read_text().splitlines():
            _, logged, _, upstream = line.split(" ", 3)
            if logged == path:
                found.append(upstream)
        return found

    def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown: open streams are closed, not waited for)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def site(servers: list[str], listen: str, name: str) -> str:
    """The configuration of the balancer itself, for ``servers`` (``host:port`` each)."""
    lines = "\n".join(f"    server {server};" for server in servers)
    return SITE.format(servers=lines, listen=listen, name=name)


def start_nginx(servers: list[str], prefix: Path, host: str) -> Nginx:
    """Run nginx over ``servers`` from ``prefix`` and wait until a request through it
    (with ``Host: host``) is answered by one of them."""
    executable = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(executable, os.X_OK):
        pytest.fail("nginx is not installed; the README's test command installs it")
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # As root, nginx's workers would switch to "nobody", who cannot enter the test's
    # directory; as anyone else, the directive is refused.
    user = "user root;" if os.geteuid() == 0 else ""
    text = _MAIN.format(user=user, prefix=prefix, site=site(servers, f"127.0.0.1:{port}", host))
    (prefix / "nginx.conf").write_text(text)
    process = subprocess.Popen(
        [executable, "-c", str(prefix / "nginx.conf"), "-p", str(prefix), "-g", "daemon off;"],
        stderr=subprocess.DEVNULL,
    )
    nginx = Nginx(process, port, prefix)

    def answers() -> bool:
        assert process.poll() is None, (prefix / "error.log").read_text()
        try:
            answer = requests.get(f"{nginx.url}/livez", headers={"Host": host}, timeout=5)
        except requests.ConnectionError:
            return False
        return answer.status_code == 200

    try:
        until(answers, what="nginx to answer")
    except BaseException:
        nginx.stop()
        raise
    return nginx
