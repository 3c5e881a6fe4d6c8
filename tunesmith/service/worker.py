"""The worker: claims queued jobs one at a time and trains each in a child process.

Claiming is one conditional UPDATE (``WHERE id = <oldest queued> AND status =
'queued' AND worker_id IS NULL``) whose row count says who won, so any number of
workers on any number of machines sharing the database never run a job twice.
While the child trains, the worker refreshes the job's heartbeat and watches its
status: ``cancelled`` kills the child at once, ``paused`` gives it time to save a
checkpoint. A job whose worker stopped heart-beating (killed, machine lost) is
queued again by the next worker that notices, and resumes from its last
checkpoint.

Run one with ``tunesmith worker`` or ``python -m tunesmith.service.worker``.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select, update

from tunesmith.service import db, jobs
from tunesmith.service.context import ServiceContext
from tunesmith.service.lifeline import child_env, die_with_parent
from tunesmith.service.settings import host_name
from tunesmith.service.worker_child import EXIT_REQUEUE, WORKER_ENV

log = logging.getLogger("tunesmith.service.worker")

KILL_WAIT_S = 10.0


def new_worker_id() -> str:
    """``host:pid:random``: the host and pid let a worker on the same machine see that its owner died."""
    return f"{host_name()}:{os.getpid()}:{secrets.token_hex(4)}"


def owner_is_dead(worker_id: str) -> bool:
    """True when ``worker_id`` names a process on this machine that no longer exists."""
    import psutil

    host, _, rest = worker_id.partition(":")
    pid_text = rest.partition(":")[0]
    if host != host_name() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True  # our own pid but not our id (callers skip their own): an earlier process that died
    try:
        process = psutil.Process(pid)
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@dataclass
class Outcome:
    """How a job's child ended, as seen by the worker."""

    exit_code: int
    killed_for: str | None = None


class Worker:
    """One worker loop.

    Args:
        ctx: settings and database.
        worker_id: this worker's identity in the jobs table (default: host:pid:random).
    """

    def __init__(self, ctx: ServiceContext, worker_id: str | None = None):
        self.ctx = ctx
        self.settings = ctx.settings
        self.id = worker_id or new_worker_id()
        self.stopping = threading.Event()
        self._last_recovery = 0.0

    # ------------------------------------------------------------------ the loop
    def run_forever(self) -> None:
        """Recover abandoned jobs, then claim and run jobs until :meth:`stop` is called."""
        log.info("worker %s started", self.id)
        while not self.stopping.is_set():
            self.recover_if_due()
            job_id = self.claim()
            if job_id is None:
                self.stopping.wait(self.settings.poll_s)
                continue
            self.run_job(job_id)
        log.info("worker %s stopped", self.id)

    def stop(self) -> None:
        """Ask the loop to finish: a running job is checkpointed and queued again."""
        self.stopping.set()

    def run_once(self) -> str | None:
        """Recover, claim one job and run it to its end (for tests and scripts); returns its id."""
        self.recover_abandoned()
        job_id = self.claim()
        if job_id is not None:
            self.run_job(job_id)
        return job_id

    # ------------------------------------------------------------------ claiming
    def claim(self) -> str | None:
        """Take the oldest queued job, atomically; None when there is none (or others won them all)."""
        engine = self.ctx.engine
        for _ in range(5):
            with engine.connect() as conn:
                candidate = conn.execute(select(db.jobs.c.id).where(db.jobs.c.status == jobs.QUEUED)
                                         .where(db.jobs.c.worker_id.is_(None))
                                         .order_by(db.jobs.c.seq).limit(1)).first()
            if candidate is None:
                return None
            now = time.time()
            with engine.begin() as conn:
                won = conn.execute(
                    update(db.jobs).where(db.jobs.c.id == candidate.id).where(db.jobs.c.status == jobs.QUEUED)
                    .where(db.jobs.c.worker_id.is_(None))
                    .values(status=jobs.RUNNING, worker_id=self.id, heartbeat_at=now, estimated_finish=None,
                            attempts=db.jobs.c.attempts + 1)).rowcount
                if won == 1:
                    conn.execute(update(db.jobs).where(db.jobs.c.id == candidate.id)
                                 .where(db.jobs.c.started_at.is_(None)).values(started_at=int(now)))
                    return candidate.id
        return None

    # ------------------------------------------------------------------ running
    def run_job(self, job_id: str) -> Outcome:
        """Run a claimed job's child to its end, heart-beating and obeying cancel/pause."""
        log.info("worker %s runs %s", self.id, job_id)
        # A session of its own: a Ctrl-C in the terminal (SIGINT to the whole process group) must not
        # reach the child directly; the worker alone tells it to stop, exactly once.
        child = subprocess.Popen([sys.executable, "-m", "tunesmith.service.worker_child", job_id],
                                 env=child_env({WORKER_ENV: self.id}), start_new_session=True)
        outcome = self._watch(job_id, child)
        self._settle(job_id, outcome)
        return outcome

    def _watch(self, job_id: str, child: subprocess.Popen) -> Outcome:
        pause_deadline = shutdown_deadline = None
        killed_for = None
        while True:
            try:
                code = child.wait(timeout=self.settings.heartbeat_s)
                return Outcome(code, killed_for)
            except subprocess.TimeoutExpired:
                pass
            status, owner = self.heartbeat(job_id)
            now = time.monotonic()
            if owner != self.id or status in (jobs.CANCELLED, jobs.FAILED, jobs.QUEUED):
                killed_for = "cancelled" if status == jobs.CANCELLED else "lost"
                _kill(child)
            elif status == jobs.PAUSED:
                pause_deadline = pause_deadline or now + self.settings.pause_grace_s
                if now > pause_deadline:
                    killed_for = "pause timeout"
                    _kill(child)
            if self.stopping.is_set() and killed_for is None:
                if shutdown_deadline is None:
                    shutdown_deadline = now + self.settings.pause_grace_s
                    child.send_signal(signal.SIGTERM)  # the recipe checkpoints and stops
                elif now > shutdown_deadline:
                    killed_for = "shutdown timeout"
                    _kill(child)

    def heartbeat(self, job_id: str) -> tuple[str, str | None]:
        """Refresh the job's heartbeat (if still ours); returns its status and owner."""
        with self.ctx.engine.begin() as conn:
            conn.execute(update(db.jobs).where(db.jobs.c.id == job_id).where(db.jobs.c.worker_id == self.id)
                         .values(heartbeat_at=time.time()))
            row = conn.execute(select(db.jobs.c.status, db.jobs.c.worker_id).where(db.jobs.c.id == job_id)).one()
        return row.status, row.worker_id

    def _settle(self, job_id: str, outcome: Outcome) -> None:
        """After the child: queue again on shutdown, fail on a crash, then release the job."""
        table = db.jobs
        mine = (table.c.id == job_id) & (table.c.worker_id == self.id)
        with self.ctx.engine.begin() as conn:
            row = conn.execute(select(table.c.status, table.c.worker_id).where(table.c.id == job_id)).one()
            if row.worker_id != self.id:
                return  # another worker took it over; nothing here is ours to write
            if row.status == jobs.RUNNING:
                if outcome.exit_code == EXIT_REQUEUE or (self.stopping.is_set() and outcome.killed_for != "lost"):
                    # stopping the worker never fails a job: it continues from its last checkpoint
                    conn.execute(update(table).where(mine).values(status=jobs.QUEUED, resume=1))
                    jobs.add_event(conn, job_id, "The worker stopped; the job is queued again and will resume "
                                                 "from its last checkpoint", level="warn")
                else:
                    message = (f"The training process exited unexpectedly (exit code {outcome.exit_code}"
                               + (", killed by the worker: " + outcome.killed_for if outcome.killed_for else "")
                               + ") without recording a result.")
                    conn.execute(update(table).where(mine).values(
                        status=jobs.FAILED, finished_at=db.now(), estimated_finish=None,
                        error={"code": "server_error", "message": message, "param": None}))
                    jobs.add_event(conn, job_id, message, level="error")
            elif row.status == jobs.PAUSED:
                conn.execute(update(table).where(mine).values(resume=1))
            elif row.status == jobs.CANCELLED and outcome.killed_for == "cancelled":
                jobs.add_event(conn, job_id, "Training stopped")
            conn.execute(update(table).where(mine).values(worker_id=None, heartbeat_at=None))

    # ------------------------------------------------------------------ recovery
    def recover_if_due(self) -> None:
        """Look for abandoned jobs at start and then every few seconds."""
        interval = min(self.settings.stale_after_s / 2, 10.0)
        if time.monotonic() - self._last_recovery >= interval:
            self.recover_abandoned()

    def recover_abandoned(self) -> list[str]:
        """Queue again the running jobs whose worker died; release others' stale holds. Returns the ids requeued."""
        self._last_recovery = time.monotonic()
        table = db.jobs
        stale_before = time.time() - self.settings.stale_after_s
        requeued = []
        with self.ctx.engine.connect() as conn:
            held = list(conn.execute(select(table.c.id, table.c.status, table.c.worker_id, table.c.heartbeat_at)
                                     .where(table.c.worker_id.is_not(None)).where(table.c.worker_id != self.id)))
        for job in held:
            dead = owner_is_dead(job.worker_id)
            if not dead and (job.heartbeat_at or 0) >= stale_before:
                continue
            same = (table.c.id == job.id) & (table.c.worker_id == job.worker_id)
            with self.ctx.engine.begin() as conn:
                if job.status == jobs.RUNNING:
                    won = conn.execute(update(table).where(same).where(table.c.status == jobs.RUNNING)
                                       .values(status=jobs.QUEUED, resume=1, worker_id=None, heartbeat_at=None,
                                               estimated_finish=None)).rowcount
                    if won:
                        age = time.time() - (job.heartbeat_at or 0)
                        why = "its process is gone" if dead else f"no heartbeat for {age:.0f} s"
                        jobs.add_event(conn, job.id, f"The worker running this job stopped ({job.worker_id}: {why}); "
                                                     "the job is queued again and will resume from its last "
                                                     "checkpoint", level="warn")
                        requeued.append(job.id)
                else:
                    conn.execute(update(table).where(same).values(worker_id=None, heartbeat_at=None))
        if requeued:
            log.warning("requeued abandoned jobs: %s", ", ".join(requeued))
        return requeued


def _kill(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.kill()
        try:
            child.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            log.error("training process %s did not die after SIGKILL", child.pid)


def run_worker(ctx: ServiceContext | None = None) -> None:
    """Run one worker until SIGTERM/SIGINT (the running job is checkpointed and queued again)."""
    ctx = ctx or ServiceContext.from_env()
    worker = Worker(ctx)

    def on_signal(_signum, _frame):
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.run_forever()


def main() -> None:
    """``python -m tunesmith.service.worker``: a worker started by ``tunesmith serve`` (dies with it)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    die_with_parent()
    run_worker()


if __name__ == "__main__":
    main()
