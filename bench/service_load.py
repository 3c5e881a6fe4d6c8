"""Service figures (not a test): API load, upload memory, workers killed mid-job.

Starts a real ``tunesmith serve`` in a temporary TUNESMITH_HOME with a tiny random
model registered as ``tiny`` and measures:

1. ``--clients`` concurrent official-client users listing and retrieving files, jobs
   and models for ``--seconds``: requests, errors, p50/p99 latency; then the listing
   latency while ``--chats`` clients keep the model generating ("mixed").
2. the server's RSS while a ``--upload-gb`` file uploads (streamed by the client too).
3. ``--kills`` SIGKILLs of the worker at random moments of running jobs (the server
   restarts it; the job resumes from its checkpoint): jobs finished, jobs lost, steps
   trained twice.

    python bench/service_load.py                # everything
    python bench/service_load.py --part load    # one part: load | mixed | upload | kills
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.service.conftest import Server, all_events, chat_rows, wait_finished, write_jsonl  # noqa: E402


def tiny_model(scratch: Path) -> Path:
    """The tests' tiny random Llama with SmolLM2's tokenizer (converted SmolLM2 needed once)."""
    from tests.conftest import MODELS_CACHE, build_tiny_model

    os.environ.setdefault("TUNESMITH_MODELS_DIR", str(MODELS_CACHE))
    from tunesmith.models.store import resolve_model

    return build_tiny_model(resolve_model("smollm2-135m").path, scratch / "tiny")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


# ------------------------------------------------------------------------------------- 1. load

def measure_load(server: Server, clients: int, seconds: float, data: Path) -> dict:
    """``clients`` threads, each with its own openai client, listing and retrieving until time is up."""
    setup = server.client()
    uploaded = setup.files.create(file=data.open("rb"), purpose="fine-tune")
    job = setup.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id)
    setup.fine_tuning.jobs.cancel(job.id)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def user(index: int) -> None:
        client = server.client()
        calls = [lambda: client.files.list(), lambda: client.files.retrieve(uploaded.id),
                 lambda: client.fine_tuning.jobs.list(limit=20), lambda: client.fine_tuning.jobs.retrieve(job.id),
                 lambda: client.fine_tuning.jobs.list_events(job.id), lambda: client.models.list()]
        turn = index
        while time.monotonic() < stop_at:
            call = calls[turn % len(calls)]
            turn += 1
            started = time.perf_counter()
            try:
                call()
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
            except Exception as exc:  # counted, not raised: the figure is the error count
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])

    threads = [threading.Thread(target=user, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(latencies) + len(errors),
            "errors": len(errors), "first_errors": errors[:3], "requests_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(percentile(latencies, 0.50) * 1000, 1),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 1)}


def measure_mixed(server: Server, chats: int, seconds: float) -> dict:
    """Listing latency while ``chats`` clients keep the model busy (half of them streaming)."""
    client = server.client()
    question = [{"role": "user", "content": "Ticket T-101"}]
    client.chat.completions.create(model="tiny", messages=question, max_tokens=2)  # load the model first
    stop_at = time.monotonic() + seconds
    answered, errors = [0], []

    def chatter(index: int) -> None:
        mine = server.client()
        while time.monotonic() < stop_at:
            try:
                reply = mine.chat.completions.create(model="tiny", messages=question, max_tokens=64,
                                                     temperature=1.0, stream=bool(index % 2))
                if index % 2:
                    list(reply)
                answered[0] += 1
            except Exception as exc:  # counted, not raised
                errors.append(f"{type(exc).__name__}: {exc}"[:200])

    threads = [threading.Thread(target=chatter, args=(i,)) for i in range(chats)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    latencies = []
    while time.monotonic() < stop_at:
        started = time.perf_counter()
        client.files.list()
        latencies.append(time.perf_counter() - started)
    for thread in threads:
        thread.join()
    return {"chat_clients": chats, "chats_answered": answered[0], "chat_errors": len(errors),
            "list_requests": len(latencies), "list_p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
            "list_p99_ms": round(percentile(latencies, 0.99) * 1000, 1)}


# ------------------------------------------------------------------------------------- 2. upload

def measure_upload(server: Server, gigabytes: float) -> dict:
    """Stream a generated multipart body of ``gigabytes`` while sampling the server's RSS."""
    line = (json.dumps(chat_rows(1)[0]) + "\n").encode()
    total = int(gigabytes * 1024**3) // len(line) * len(line)  # whole lines: the file stays valid JSONL
    boundary = "tunesmithbench"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    block = line * (1024 * 1024 // len(line))
    body_size = len(head) + total + len(tail)

    def body():
        yield head
        sent = 0
        while sent < total:
            piece = block if total - sent >= len(block) else line * ((total - sent) // len(line))
            sent += len(piece)
            yield piece
        yield tail

    process = psutil.Process(server.process.pid)
    baseline = process.memory_info().rss
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(process.memory_info().rss)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    reply = httpx.post(f"{server.base_url}/files", content=body(), timeout=3600,
                       headers={"Authorization": f"Bearer {server.env['TUNESMITH_API_KEY']}",
                                "Content-Type": f"multipart/form-data; boundary={boundary}",
                                "Content-Length": str(body_size)})
    elapsed = time.perf_counter() - started
    done.set()
    sampler.join()
    reply.raise_for_status()
    stored = reply.json()
    server.client().files.delete(stored["id"])
    return {"bytes": stored["bytes"], "seconds": round(elapsed, 1), "MB_per_s": round(total / elapsed / 1e6, 1),
            "rss_before_MB": round(baseline / 1e6, 1), "rss_max_MB": round(max(samples) / 1e6, 1),
            "rss_growth_MB": round((max(samples) - baseline) / 1e6, 1)}


# ------------------------------------------------------------------------------------- 3. kills

def worker_processes(server: Server) -> list[psutil.Process]:
    return [p for p in psutil.Process(server.process.pid).children()
            if "tunesmith.service.worker" in (p.cmdline() or [])]


def measure_kills(server: Server, kills: int, data: Path, seed: int = 0) -> dict:
    """Run jobs one after another, SIGKILLing the worker at random moments, until ``kills`` kills."""
    rng = random.Random(seed)
    client = server.client()
    uploaded = client.files.create(file=data.open("rb"), purpose="fine-tune")
    job_ids, done_kills = [], 0
    while done_kills < kills:
        job = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id,
                                             hyperparameters={"n_epochs": 6, "batch_size": 4},
                                             extra_body={"tunesmith": {"save_every_steps": 2}})
        job_ids.append(job.id)
        for _ in range(rng.randint(1, 3)):  # one to three kills in this job
            if done_kills >= kills:
                break
            time.sleep(rng.uniform(1.0, 8.0))
            if client.fine_tuning.jobs.retrieve(job.id).status in ("succeeded", "failed", "cancelled"):
                break
            for worker in worker_processes(server):
                worker.kill()
                done_kills += 1
            time.sleep(2.0)  # the server starts another worker
    finished = [wait_finished(client, job_id, timeout=600) for job_id in job_ids]
    twice = 0
    for job_id in job_ids:
        steps = [e.data["step"] for e in all_events(client, job_id) if e.type == "metrics"]
        twice += len(steps) - len(set(steps))
    return {"kills": done_kills, "jobs": len(job_ids),
            "succeeded": sum(j.status == "succeeded" for j in finished),
            "lost": sum(j.status != "succeeded" for j in finished),
            "steps_recorded_twice": twice}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "load", "mixed", "upload", "kills"], default="all")
    parser.add_argument("--chats", type=int, default=60, help="concurrent chat clients in the mixed part")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--upload-gb", type=float, default=1.0)
    parser.add_argument("--kills", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as scratch:
        scratch = Path(scratch)
        tiny = tiny_model(scratch)
        data = write_jsonl(scratch / "train.jsonl", chat_rows(12))
        home = scratch / "home"
        home.mkdir()
        server = Server(home, tiny, workers=1, extra_env={"TUNESMITH_MAX_UPLOAD_BYTES": str(4 * 1024**3)}).start()
        results = {}
        try:
            if args.part in ("all", "load"):
                results["load"] = measure_load(server, args.clients, args.seconds, data)
                print("load:", json.dumps(results["load"]), flush=True)
            if args.part in ("all", "mixed"):
                results["mixed"] = measure_mixed(server, args.chats, min(args.seconds, 15))
                print("mixed:", json.dumps(results["mixed"]), flush=True)
            if args.part in ("all", "upload"):
                results["upload"] = measure_upload(server, args.upload_gb)
                print("upload:", json.dumps(results["upload"]), flush=True)
            if args.part in ("all", "kills"):
                results["kills"] = measure_kills(server, args.kills, data)
                print("kills:", json.dumps(results["kills"]), flush=True)
        finally:
            server.stop()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
