"""One Envoy for the run: started on the rewritten bootstrap, ready when its admin says so,
stopped by its PID (and killed by a watchdog if the run outlives its bound)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import time
from pathlib import Path

from xdsplane.policytest.hermetic import PolicyTestError
from xdsplane.redact import scrub_message

READY_SECONDS = 60.0  # a cold Envoy on a slow, shared machine starts well within this


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


class RunEnvoy:
    def __init__(self, binary: str, folder: Path, config: str, max_seconds: float) -> None:
        self.folder = folder
        self.config_path = folder / "envoy.json"
        self.admin_path = folder / "envoy-admin.txt"
        self.log_path = folder / "envoy.log"
        _write_private(self.config_path, config)
        self.argv = [
            binary,
            *("-c", str(self.config_path)),
            "--disable-hot-restart",
            *("--concurrency", "1"),
            *("-l", "warning"),
            *("--admin-address-path", str(self.admin_path)),
        ]
        self.max_seconds = max_seconds
        self.popen: subprocess.Popen[bytes] | None = None
        self.admin = ""
        self._watchdog: threading.Timer | None = None

    def start(self) -> RunEnvoy:
        with open(self.log_path, "wb") as log:
            try:
                self.popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,  # same session: a Ctrl-C stops it with the run
                )
            except OSError as e:
                raise PolicyTestError([f"cannot run {self.argv[0]}: {e}"]) from None
        self._watchdog = threading.Timer(self.max_seconds, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise PolicyTestError([f"Envoy exited with {self.popen.returncode}: {self.tail()}"])
            if self._ready():
                return self
            time.sleep(0.02)
        raise PolicyTestError([f"Envoy was not ready within {READY_SECONDS:g}s: {self.tail()}"])

    def _expire(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()

    def _ready(self) -> bool:
        if not self.admin:
            try:
                text = self.admin_path.read_text().strip()
            except OSError:
                return False
            if not text.rpartition(":")[2].isdigit():
                return False  # not written yet, or half-way
            self.admin = text
        try:
            return self.get("/ready")[0] == 200
        except (OSError, http.client.HTTPException):
            return False

    def get(self, path: str) -> tuple[int, bytes]:
        host, _, port = self.admin.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def listener_ports(self) -> dict[str, int]:
        status, body = self.get("/listeners?format=json")
        if status != 200:
            raise PolicyTestError([f"Envoy's admin answered {status} for /listeners"])
        out = {}
        for entry in json.loads(body).get("listener_statuses", []):
            sock = entry.get("local_address", {}).get("socket_address", {})
            out[entry["name"]] = int(sock.get("port_value", 0))
        return out

    def tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no output)"
        return scrub_message(" | ".join(text.strip().splitlines()[-lines:]), limit=2000)

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
