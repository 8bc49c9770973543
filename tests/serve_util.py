"""Start and stop a real `leantune serve` process on loopback for the server tests."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import json
import urllib.error
import urllib.request


def http(method: str, url: str, body=None, headers: dict | None = None, timeout: float = 60) -> tuple[int, str]:
    """(status, text) of one plain HTTP request; a JSON body when `body` is given."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={**({"Content-Type": "application/json"} if data else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, data_dir: Path, *extra: str, key: str | None = None):
        self.port = free_port()
        self.key = key
        self.args = [sys.executable, "-m", "leantune.cli", "serve", "--model", str(model), "--data-dir", str(data_dir),
                     "--port", str(self.port), "--threads", "1", "--dtype", "fp32", *extra]  # exact tokens on any CPU
        self.log = Path(data_dir).with_suffix(".log")
        self.proc = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def start(self, timeout: float = 90) -> "Server":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(self.args, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if http("GET", f"http://127.0.0.1:{self.port}/health", headers=self.headers(), timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server did not start in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        self.proc.kill()  # SIGKILL: no cleanup runs
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.key or "none", max_retries=0, timeout=120)
