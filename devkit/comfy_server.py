"""A real ComfyUI HTTP server (python main.py) on loopback, driven through its public API."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .paths import comfy_flags, comfyui_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base: Path, log_path: Path, extra_flags: tuple[str, ...] = (), env: dict[str, str] | None = None):
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [
            sys.executable, "main.py", *comfy_flags(base),
            "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch", *extra_flags,
        ]
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(cmd, cwd=comfyui_dir(), stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 120.0) -> "ComfyServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited with {self.process.returncode}; log:\n{self.log()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.25)
        raise TimeoutError(f"ComfyUI server not ready after {timeout}s; log:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: dict):
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
                return json.loads(body) if body else None
        except urllib.error.HTTPError as err:
            return {"http_status": err.code, **json.loads(err.read() or b"{}")}

    def queue(self, graph: dict) -> dict:
        """POST /prompt; returns the server's reply (prompt_id, or error and node_errors)."""
        return self.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})

    def wait_history(self, prompt_id: str, timeout: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                entry["status"].get("status_str") in ("success", "error")
            ):
                return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s; log:\n{self.log()}")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
