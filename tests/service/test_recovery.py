"""Killing workers and the server: jobs resume from their last checkpoint, queued jobs survive,
nothing runs twice."""

from __future__ import annotations

import signal

import psutil
import pytest

from tests.service.conftest import Server, all_events, wait_finished, wait_for
from tests.service.test_api import training_processes

# 150 steps on the 12-example file: long enough that a kill lands mid-run (the tiny model
# trains a dozen steps in well under a second)
LONG = {"n_epochs": 50, "batch_size": 4}
LONG_STEPS = list(range(1, 151))


def started_count(events) -> int:
    return sum(e.message == "Fine-tuning job started" for e in events)


def metric_steps(events) -> list[int]:
    return sorted(e.data["step"] for e in events if e.type == "metrics")


def wait_gone(processes: list[psutil.Process], timeout: float = 10) -> None:
    gone, alive = psutil.wait_procs(processes, timeout=timeout)
    assert not alive, f"still alive: {alive}"


def test_sigkill_of_a_worker_mid_job_resumes_from_its_checkpoint(tiny_model_path, tmp_path, train_file):
    server = Server(tmp_path, tiny_model_path, workers=0).start()
    worker = server.start_worker()
    replacement = None
    try:
        client = server.client()
        uploaded = client.files.create(file=train_file.open("rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id, hyperparameters=LONG,
                                             extra_body={"tunesmith": {"save_every_steps": 2}})
        wait_for(client, job.id, lambda j: len(client.fine_tuning.jobs.checkpoints.list(j.id).data) >= 1)
        children = training_processes(job.id)
        assert children
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        wait_gone(children)  # the training child dies with its worker
        assert client.fine_tuning.jobs.retrieve(job.id).status == "running"  # nobody knows yet

        replacement = server.start_worker()
        job = wait_finished(client, job.id)
        assert job.status == "succeeded", job.error
        events = all_events(client, job.id)
        assert any(e.level == "warn" and "stopped" in e.message for e in events)
        assert any(e.message.startswith("Resuming from checkpoint step") for e in events)
        assert started_count(events) == 2
        assert metric_steps(events) == LONG_STEPS  # each step counted once
        steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id)]
        assert len(steps) == len(set(steps)) and max(steps) == LONG_STEPS[-1]
    finally:
        for process in (worker, replacement):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=60)
        server.stop()


def test_sigkill_of_the_server_then_restart_resumes_and_keeps_queued_jobs(tiny_model_path, tmp_path, train_file):
    server = Server(tmp_path, tiny_model_path, workers=1).start()
    client = server.client()
    uploaded = client.files.create(file=train_file.open("rb"), purpose="fine-tune")
    first = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id, hyperparameters=LONG,
                                           extra_body={"tunesmith": {"save_every_steps": 2}})
    second = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id,
                                            hyperparameters={"n_epochs": 1, "batch_size": 4})
    wait_for(client, first.id, lambda j: len(client.fine_tuning.jobs.checkpoints.list(j.id).data) >= 1)
    assert client.fine_tuning.jobs.retrieve(second.id).status == "queued"
    family = psutil.Process(server.process.pid).children(recursive=True)
    server.stop(signal.SIGKILL)
    wait_gone(family)  # workers and training children die with the server

    restarted = Server(tmp_path, tiny_model_path, workers=1)
    restarted.start()
    try:
        client = restarted.client()
        for job_id in (first.id, second.id):
            job = wait_finished(client, job_id)
            assert job.status == "succeeded", job.error
        first_events, second_events = all_events(client, first.id), all_events(client, second.id)
        assert any("stopped" in e.message and e.level == "warn" for e in first_events)
        assert metric_steps(first_events) == LONG_STEPS
        assert started_count(second_events) == 1 and metric_steps(second_events) == [1, 2, 3]
        started = {j.id: j for j in client.fine_tuning.jobs.list()}
        assert started[first.id].fine_tuned_model != started[second.id].fine_tuned_model
    finally:
        restarted.stop()


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_graceful_stop_requeues_the_running_job(tiny_model_path, tmp_path, train_file, signal_name):
    server = Server(tmp_path, tiny_model_path, workers=1).start()
    client = server.client()
    uploaded = client.files.create(file=train_file.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id, hyperparameters=LONG,
                                         extra_body={"method": "lora"})
    wait_for(client, job.id, lambda j: (j.trained_tokens or 0) > 0)
    server.stop(getattr(signal, signal_name), group=True)  # like systemd's stop or a Ctrl-C
    restarted = Server(tmp_path, tiny_model_path, workers=1).start()
    try:
        client = restarted.client()
        job = wait_finished(client, job.id)
        assert job.status == "succeeded", job.error
        events = all_events(client, job.id)
        assert any(e.message.startswith("The worker stopped; the job is queued again") for e in events)
        assert any(e.message.startswith("Resuming from checkpoint step") and not e.message.endswith(" 0")
                   for e in events)
        assert metric_steps(events) == LONG_STEPS
        assert job.model_extra["tunesmith"] == {"method": "lora"}
    finally:
        restarted.stop()
