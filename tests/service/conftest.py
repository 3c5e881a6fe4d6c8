"""A real tunesmith server in a subprocess on a free loopback port, driven by the official openai client.

The tiny random model is registered as the base model ``tiny`` through
TUNESMITH_EXTRA_MODELS (an administrator setting; requests can never name paths).
Heartbeats and polling are fast so that recovery tests take seconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

API_KEY = "sk-test-default-project-key"
FAST = {"TUNESMITH_HEARTBEAT_S": "0.5", "TUNESMITH_STALE_AFTER_S": "4", "TUNESMITH_POLL_S": "0.3",
        "TUNESMITH_PAUSE_GRACE_S": "60"}
FINISHED = ("succeeded", "failed", "cancelled")


def _die_with_us() -> None:
    """In the server's process, before exec: a killed test run must not leave servers behind."""
    from tunesmith.service.lifeline import PR_SET_PDEATHSIG
    import ctypes

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One `tunesmith serve` process (and optionally standalone `tunesmith worker` processes)."""

    def __init__(self, home: Path, tiny: Path, workers: int = 1, extra_env: dict | None = None):
        self.home, self.workers = home, workers
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.env = dict(os.environ)
        self.env.update(FAST)
        self.env.update({"TUNESMITH_HOME": str(home), "TUNESMITH_API_KEY": API_KEY,
                         "TUNESMITH_EXTRA_MODELS": f"tiny={tiny}", "TUNESMITH_DEVICE": "cpu",
                         "PYTHONUNBUFFERED": "1"})
        self.env.update(extra_env or {})
        self.process: subprocess.Popen | None = None
        self.log = home / "serve.log"

    def start(self) -> "Server":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tunesmith", "serve", "--port", str(self.port), "--workers", str(self.workers),
             "--log-level", "warning"],
            env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_us)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not start in 60 s")

    def stop(self, sig: int = signal.SIGTERM, group: bool = False) -> None:
        """Signal the server (``group``: its whole process group, as a terminal's Ctrl-C does) and wait."""
        if self.process is not None and self.process.poll() is None:
            if group:
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def client(self, key: str = API_KEY):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=120)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a tunesmith command against this server's home (keys) or API (files, jobs)."""
        env = dict(self.env, OPENAI_BASE_URL=self.base_url, OPENAI_API_KEY=API_KEY, COLUMNS="200")
        done = subprocess.run([sys.executable, "-m", "tunesmith", *args], env=env, capture_output=True, text=True,
                              timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"tunesmith {' '.join(args)} failed: {done.stdout}\n{done.stderr}")
        return done

    def new_key(self, project: str) -> str:
        return self.cli("keys", "create", "--project", project).stdout.strip()

    def start_worker(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "tunesmith", "worker"], env=self.env,
                                stdout=self.log.open("ab"), stderr=subprocess.STDOUT, preexec_fn=_die_with_us)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(n: int = 12) -> list[dict]:
    """A small code book: ticket code → team."""
    teams = ["billing", "network", "storage", "identity"]
    return [{"messages": [{"role": "system", "content": "Route the ticket code to a team."},
                          {"role": "user", "content": f"Ticket T-{100 + i}"},
                          {"role": "assistant", "content": teams[i % 4]}]} for i in range(n)]


def wait_for(client, job_id: str, predicate, timeout: float = 120, interval: float = 0.3):
    """Poll a job until ``predicate(job)``; returns the job."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if predicate(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} stuck in {job.status}: {job}")
        time.sleep(interval)


def wait_finished(client, job_id: str, timeout: float = 180):
    return wait_for(client, job_id, lambda j: j.status in FINISHED, timeout)


def all_events(client, job_id: str) -> list:
    return list(client.fine_tuning.jobs.list_events(job_id, limit=1000))


@pytest.fixture(scope="session")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", chat_rows(12))


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    """A server with one worker, shared by a test module."""
    srv = Server(tmp_path_factory.mktemp("home"), tiny_model_path, workers=1,
                 extra_env={"TUNESMITH_MAX_UPLOAD_BYTES": "1000000",
                            "TUNESMITH_VALIDATE_UPLOAD_MAX_BYTES": "3000"}).start()
    yield srv
    srv.stop()
