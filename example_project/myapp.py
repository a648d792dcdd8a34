"""myapp: a tiny status service, with the habits of many real apps.

It keeps its settings in ``~/.myapp/config`` or ``/etc/myapp.conf``, serves a small JSON API on a
fixed port, starts a background "cache warmer" daemon, names itself after the machine's hostname
and checks for updates at start-up. Each habit makes its tests touch the machine they run on.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__version__ = "1.4.2"

DEFAULT_PORT = 8765
USER_CONFIG = "~/.myapp/config"
SYSTEM_CONFIG = "/etc/myapp.conf"
DEFAULTS = {"greeting": "hello", "color": "blue"}
# Where the app phones home. A documentation address (RFC 5737 TEST-NET-3): it must never be
# reached, and inside a jail (no network but ``lo``) the connect fails at once.
UPDATE_HOST = "203.0.113.1"
UPDATE_PORT = 80


# -- settings ---------------------------------------------------------------------------------

def _fallback_config() -> str:
    # Like matplotlib's cache dir: when the normal place is not writable, use a per-user temp file.
    return os.path.join(tempfile.gettempdir(), f"myapp-{os.getuid()}.conf")


def config_locations() -> list[str]:
    """Where settings are looked for, most specific first."""
    return [os.path.expanduser(USER_CONFIG), SYSTEM_CONFIG, _fallback_config()]


def save_settings(settings: dict[str, str], *, system: bool = False) -> str:
    """Save ``settings`` for this user (or, with ``system``, for the whole machine); return the file.

    A read-only home or /etc is not an error: the settings go to a temp file instead.
    """
    path = SYSTEM_CONFIG if system else os.path.expanduser(USER_CONFIG)
    for target in (path, _fallback_config()):
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w") as f:
                json.dump(settings, f)
            return target
        except OSError:
            continue
    raise OSError(f"cannot save settings to {path} nor to {_fallback_config()}")


def load_settings() -> dict[str, str]:
    """The defaults, overridden by the first settings file found."""
    for path in config_locations():
        try:
            with open(path) as f:
                return {**DEFAULTS, **json.load(f)}
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
    return dict(DEFAULTS)


# -- identity ---------------------------------------------------------------------------------

def instance_name() -> str:
    """How this instance shows up on dashboards: ``myapp@<hostname>``."""
    return f"myapp@{socket.gethostname()}"


# -- the API server ---------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        routes = {
            "/status": lambda: {"ok": True, "instance": instance_name()},
            "/version": lambda: {"version": __version__},
        }
        if self.path not in routes:
            self.send_error(404)
            return
        body = json.dumps(routes[self.path]()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def running_server(port: int = DEFAULT_PORT) -> Iterator[int]:
    """Serve the API on 127.0.0.1:``port`` in a thread while the block runs."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def get_json(port: int, path: str) -> dict[str, object]:
    """A client of the API (no proxies involved: it talks to 127.0.0.1 directly)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {response.status}")
        return json.loads(response.read())
    finally:
        conn.close()


# -- the background daemon --------------------------------------------------------------------

def start_cache_warmer(pidfile: str | os.PathLike[str]) -> int:
    """Start the cache warmer daemon; return its pid.

    The shell backgrounds it and exits at once (a double fork), so the daemon outlives its caller,
    and nothing in this app ever stops it.
    """
    env = {**os.environ, "MYAPP_ROLE": "cache-warmer"}
    subprocess.run(
        ["sh", "-c", 'sleep 600 </dev/null >/dev/null 2>&1 & echo $! > "$1"', "sh", os.fspath(pidfile)],
        env=env,
        check=True,
    )
    with open(pidfile) as f:
        return int(f.read())


# -- the update check ("phoning home") --------------------------------------------------------

@dataclass
class UpdateStatus:
    online: bool
    latest: str | None = None
    error: str | None = None


def check_for_updates(timeout: float = 3.0) -> UpdateStatus:
    """Ask the update server for the latest version; being offline is not an error."""
    conn = http.client.HTTPConnection(UPDATE_HOST, UPDATE_PORT, timeout=timeout)
    try:
        conn.request("GET", "/myapp/latest.json")
        latest = json.loads(conn.getresponse().read())["version"]
        return UpdateStatus(online=True, latest=latest)
    except (OSError, ValueError, KeyError) as exc:
        return UpdateStatus(online=False, error=f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()
