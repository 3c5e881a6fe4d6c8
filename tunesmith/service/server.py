"""``tunesmith serve``: the API in this process, N workers as supervised child processes.

A worker that dies (crash, SIGKILL, out of memory) is started again; the new one
finds the job the old one held and resumes it from its last checkpoint. The
workers die with the server even when it is SIGKILLed (see ``lifeline``), and
on a normal stop they checkpoint their jobs and queue them again.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time

from tunesmith.service.context import ServiceContext
from tunesmith.service.lifeline import child_env

log = logging.getLogger("tunesmith.service.server")

RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 60.0


class WorkerPool:
    """Keeps ``count`` worker processes alive."""

    def __init__(self, count: int, grace_s: float):
        self.count, self.grace_s = count, grace_s
        self.processes: list[subprocess.Popen] = []
        self.restarts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the workers and a thread that restarts any that exit."""
        if self.count == 0:
            return
        # The supervising thread spawns every worker: PR_SET_PDEATHSIG fires when the thread that
        # created a child ends, so one long-lived thread owns them all.
        self._thread = threading.Thread(target=self._supervise, name="tunesmith-workers", daemon=True)
        self._thread.start()

    def _spawn(self) -> subprocess.Popen:
        # Own sessions: only this pool signals the workers (once), not a Ctrl-C sent to the terminal's group.
        return subprocess.Popen([sys.executable, "-m", "tunesmith.service.worker"], env=child_env(),
                                start_new_session=True)

    def _supervise(self) -> None:
        self.processes = [self._spawn() for _ in range(self.count)]
        started = [time.monotonic()] * self.count
        delays = [RESTART_DELAY_S] * self.count
        log.info("started %d worker(s): pids %s", self.count, [p.pid for p in self.processes])
        while not self._stop.wait(0.5):
            for index, process in enumerate(self.processes):
                code = process.poll()
                if code is None or self._stop.is_set():
                    continue
                # a worker that keeps exiting at once by itself (a broken setting, say) is restarted ever
                # more slowly; one killed by a signal (OOM killer, an operator) is replaced at once
                lived = time.monotonic() - started[index]
                failing = code > 0 and lived < 10
                delays[index] = min(delays[index] * 2, MAX_RESTART_DELAY_S) if failing else RESTART_DELAY_S
                log.warning("worker pid %d exited with %s after %.0f s; starting another in %.0f s",
                            process.pid, code, lived, delays[index])
                if self._stop.wait(delays[index]):
                    break
                self.processes[index] = self._spawn()
                started[index] = time.monotonic()
                self.restarts += 1
        self._shutdown()

    def _shutdown(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # the worker checkpoints its job and queues it again
        deadline = time.monotonic() + self.grace_s
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()

    def stop(self) -> None:
        """Stop the workers (they checkpoint running jobs) and wait for them."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def check_port(host: str, port: int) -> None:
    """Raises TunesmithError when ``host:port`` cannot be listened on (before any worker starts)."""
    import socket

    from tunesmith.errors import TunesmithError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TunesmithError(f"cannot listen on {host}: {exc}", "pass --host 127.0.0.1 or another address",
                             param="host") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise TunesmithError(f"cannot listen on {host}:{port}: {exc.strerror}",
                                 "is another server running there? pass --port with a free port",
                                 param="port") from None


def serve(host: str, port: int, workers: int, log_level: str = "info") -> None:
    """Run the API with ``workers`` worker processes until interrupted.

    Raises:
        TunesmithError: invalid settings, or the address is taken.
    """
    import uvicorn

    from tunesmith.service.app import create_app

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ctx = ServiceContext.from_env()
    check_port(host, port)
    app = create_app(ctx)
    pool = WorkerPool(workers, ctx.settings.pause_grace_s)
    # uvicorn re-raises the signal that stopped it once it has shut down; with the default
    # SIGTERM action that would kill this process before the workers are stopped, so
    # SIGTERM gets a handler that lets uvicorn.run return (SIGINT raises KeyboardInterrupt).
    signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    pool.start()
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    except KeyboardInterrupt:
        pass
    finally:
        log.info("stopping the workers (running jobs are checkpointed and queued again)")
        pool.stop()
