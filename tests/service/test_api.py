"""The API through the official openai client against a real server: the whole flow, errors, isolation,
cancel and pause/resume."""

from __future__ import annotations

import time

import httpx
import openai
import psutil
import pytest

from tests.service.conftest import API_KEY, all_events, chat_rows, wait_finished, wait_for, write_jsonl

FAST_JOB = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}}
QUESTION = [{"role": "user", "content": "Ticket T-101"}]


def training_processes(job_id: str) -> list[psutil.Process]:
    """Live training children of a job (``python -m tunesmith.service.worker_child JOB``)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if "tunesmith.service.worker_child" in cmdline and job_id in cmdline:
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def uploaded(client, train_file):
    return client.files.create(file=train_file.open("rb"), purpose="fine-tune")


@pytest.fixture(scope="module")
def finished_job(client, uploaded):
    """One small job trained to the end, shared by the tests that need a fine-tuned model."""
    job = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id, suffix="codes", seed=7,
                                         method=FAST_JOB, metadata={"team": "ops"},
                                         extra_body={"tunesmith": {"lora_r": 4, "lora_alpha": 8}})
    assert job.status == "validating_files" and job.id.startswith("ftjob-") and job.seed == 7
    job = wait_finished(client, job.id)
    assert job.status == "succeeded", job.error
    return job


def test_upload_list_retrieve_content(client, uploaded, train_file):
    assert uploaded.id.startswith("file-") and uploaded.object == "file"
    assert uploaded.bytes == train_file.stat().st_size and uploaded.purpose == "fine-tune"
    assert client.files.retrieve(uploaded.id).filename == "train.jsonl"
    assert uploaded.id in [f.id for f in client.files.list()]
    assert client.files.content(uploaded.id).read() == train_file.read_bytes()


def test_finished_job_fields_events_checkpoints_results(client, finished_job, server):
    job = finished_job
    assert job.fine_tuned_model == f"ft:tiny:default:codes:{job.id.removeprefix('ftjob-')}"
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at and job.estimated_finish is None
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (2, 4)
    assert isinstance(job.hyperparameters.learning_rate_multiplier, float)
    assert job.method.type == "supervised" and job.metadata == {"team": "ops"}
    assert job.model_extra["tunesmith"] == {"lora_r": 4, "lora_alpha": 8}

    events = all_events(client, job.id)
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    assert events[0].message == "The job has successfully completed"
    metrics = [e for e in events if e.type == "metrics"]
    assert sorted(e.data["step"] for e in metrics) == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(e.data["train_loss"], float) and e.data["total_steps"] == 6 for e in metrics)
    assert not any(str(server.home) in e.message or str(server.home) in str(e.data) for e in events)

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [6, 3]  # one per epoch, newest first
    last = next(e for e in metrics if e.data["step"] == 6)
    assert checkpoints[0].metrics.train_loss == pytest.approx(last.data["train_loss"])
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-6"

    csv = client.files.content(job.result_files[0]).text.splitlines()
    assert csv[0].startswith("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy")
    assert len(csv) == 7
    assert client.files.retrieve(job.result_files[0]).purpose == "fine-tune-results"


def test_chat_stream_and_completions_on_fine_tuned_checkpoint_and_base(client, finished_job):
    model = finished_job.fine_tuned_model
    answer = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=5)
    assert answer.object == "chat.completion" and answer.model == model
    assert 0 < answer.usage.completion_tokens <= 5 and answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    again = client.chat.completions.create(model=model, messages=QUESTION, temperature=0,
                                           max_completion_tokens=5)
    assert again.choices[0].message.content == answer.choices[0].message.content  # temperature 0 is greedy

    chunks = list(client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=5,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.choices[0].finish_reason

    checkpoint = client.fine_tuning.jobs.checkpoints.list(finished_job.id).data[-1].fine_tuned_model_checkpoint
    from_ckpt = client.chat.completions.create(model=checkpoint, messages=QUESTION, temperature=0, max_tokens=3)
    assert from_ckpt.usage.completion_tokens >= 1

    base = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=12)
    text = base.choices[0].message.content
    assert len(text) >= 4 and base.choices[0].finish_reason == "length"
    stop = text[2:4]
    cut = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model="tiny", messages=QUESTION, temperature=1.0, top_p=0.9, seed=3,
                                              max_tokens=8).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling reproducible

    legacy = client.completions.create(model="tiny", prompt="Ticket T-1", max_tokens=3, temperature=0)
    assert legacy.object == "text_completion" and 1 <= legacy.usage.completion_tokens <= 3
    streamed_legacy = list(client.completions.create(model="tiny", prompt="Ticket T-1", max_tokens=3,
                                                     temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed_legacy) == legacy.choices[0].text

    ids = [m.id for m in client.models.list()]
    assert "tiny" in ids and model in ids and checkpoint in ids
    assert client.models.retrieve(model).owned_by == "default"


def test_continue_fine_tuning_then_delete(client, finished_job, uploaded, train_file):
    second = client.fine_tuning.jobs.create(model=finished_job.fine_tuned_model, training_file=uploaded.id,
                                            hyperparameters={"n_epochs": 1, "batch_size": 4})
    second = wait_finished(client, second.id)
    assert second.status == "succeeded", second.error
    assert second.model == finished_job.fine_tuned_model
    assert second.fine_tuned_model.startswith("ft:tiny:default::")
    messages = [e.message for e in all_events(client, second.id)]
    assert any("continuing the adapter" in m for m in messages), messages

    deleted = client.models.delete(finished_job.fine_tuned_model)
    assert deleted.deleted and deleted.id == finished_job.fine_tuned_model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(finished_job.fine_tuned_model)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=finished_job.fine_tuned_model, messages=QUESTION, max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError):
        client.models.delete("tiny")
    # the continued model has its own weights, so it outlives its parent
    assert client.chat.completions.create(model=second.fine_tuned_model, messages=QUESTION,
                                          max_tokens=2).usage.completion_tokens >= 1

    extra = client.files.create(file=train_file.open("rb"), purpose="fine-tune")
    assert client.files.delete(extra.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(extra.id)
    assert client.files.content(uploaded.id).read() == train_file.read_bytes()  # same content, still kept


def test_bad_data_fails_upload_or_job_with_line_numbers(client, tmp_path):
    rows = chat_rows(12)
    small = tmp_path / "bad.jsonl"
    write_jsonl(small, rows)
    lines = small.read_text().splitlines()
    lines[3] = '{"messages": [}'
    small.write_text("\n".join(lines) + "\n")
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=small.open("rb"), purpose="fine-tune")
    assert caught.value.body["param"] == "file" and "bad.jsonl:4" in caught.value.body["message"]

    # larger than the server's upload-validation limit: accepted, then the job fails at validation
    big_rows = chat_rows(40)
    big_rows[6] = {"messages": [{"role": "user", "content": "no answer here " * 10}]}
    big = write_jsonl(tmp_path / "big.jsonl", big_rows)
    uploaded = client.files.create(file=big.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id)
    job = wait_finished(client, job.id)
    assert job.status == "failed" and job.error.code == "invalid_training_file"
    assert job.error.param == "training_file" and "big.jsonl:7" in job.error.message
    assert job.fine_tuned_model is None


def test_unknown_ids_are_404(client, uploaded):
    for call in (lambda: client.files.retrieve("file-nope"), lambda: client.files.content("file-nope"),
                 lambda: client.files.delete("file-nope"),
                 lambda: client.fine_tuning.jobs.retrieve("ftjob-nope"),
                 lambda: client.fine_tuning.jobs.cancel("ftjob-nope"),
                 lambda: client.fine_tuning.jobs.list_events("ftjob-nope"),
                 lambda: client.fine_tuning.jobs.checkpoints.list("ftjob-nope"),
                 lambda: client.models.retrieve("ft:tiny:default::nope"),
                 lambda: client.chat.completions.create(model="no-such-model", messages=QUESTION)):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.body["type"] == "invalid_request_error" and caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="tiny", training_file="file-nope")
    assert caught.value.body["param"] == "training_file"


def test_wrong_or_missing_key_is_401(server):
    with pytest.raises(openai.AuthenticationError) as caught:
        server.client("sk-wrong-key-123456").models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    reply = httpx.get(f"{server.base_url}/files")
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "missing_api_key"


def test_paths_and_urls_are_never_models(client):
    for name in ("../../etc/passwd", "/etc/passwd", "http://example.com/model", "tiny/../tiny", "~/model"):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=name, messages=QUESTION, max_tokens=1)
        assert caught.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(model="/etc", training_file="file-x")


def test_error_shapes_400_409_413(server, client, finished_job, uploaded):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    reply = httpx.post(f"{server.base_url}/fine_tuning/jobs", json={"model": "tiny"}, headers=headers)
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == "training_file" and "training_file" in error["message"]
    assert "loc" not in error["message"] and "pydantic" not in error["message"]

    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id,
                                       hyperparameters={"n_epochs": 0}, extra_body={"lora_rank": 4})
    assert "lora_rank" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id, hyperparameters={"n_epochs": 0},
                                       extra_body={"tunesmith": {"lora_r": 0}})
    assert "epochs" in caught.value.body["message"] and "lora_r" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id, extra_body={"lora_r": "many"})
    assert caught.value.body["param"] == "lora_r" and "validation error" not in caught.value.body["message"]

    pending = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id)
    with pytest.raises(openai.ConflictError) as caught:  # a job that has not finished needs its file
        client.files.delete(uploaded.id)
    assert caught.value.body["code"] == "file_in_use"
    client.fine_tuning.jobs.cancel(pending.id)
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(finished_job.id)
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.resume(finished_job.id)

    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("big.jsonl", b"x" * 1_200_000), purpose="fine-tune")
    assert caught.value.status_code == 413 and caught.value.body["code"] == "file_too_large"


def test_isolation_between_projects(server, client, finished_job, uploaded):
    other_key = server.new_key("other")
    assert other_key.startswith("sk-")
    other = server.client(other_key)
    mine = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id)
    client.fine_tuning.jobs.cancel(mine.id)
    for call in (lambda: other.files.retrieve(uploaded.id), lambda: other.files.content(uploaded.id),
                 lambda: other.fine_tuning.jobs.retrieve(mine.id), lambda: other.fine_tuning.jobs.cancel(mine.id),
                 lambda: other.fine_tuning.jobs.list_events(finished_job.id),
                 lambda: other.models.retrieve(finished_job.result_files[0])):
        with pytest.raises(openai.NotFoundError):
            call()
    assert other.files.list().data == [] and other.fine_tuning.jobs.list().data == []
    tuned = [m.id for m in client.models.list() if m.id.startswith("ft:")]
    assert tuned and not any(m.id.startswith("ft:") for m in other.models.list())
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=tuned[0], messages=QUESTION, max_tokens=1)
    with pytest.raises(openai.BadRequestError):  # another project's file cannot train
        other.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id)

    listed = server.cli("keys", "list", "--project", "other").stdout
    key_id = next(word for word in listed.split() if word.startswith("key-"))
    server.cli("keys", "revoke", key_id)
    with pytest.raises(openai.AuthenticationError):
        other.models.list()


def test_list_pagination_and_metadata_filter(client, uploaded):
    made = []
    for index in range(3):
        job = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id,
                                             metadata={"batch": "pages", "n": str(index)})
        client.fine_tuning.jobs.cancel(job.id)
        made.append(job.id)
    first = client.fine_tuning.jobs.list(limit=2, metadata={"batch": "pages"})
    assert [j.id for j in first.data] == [made[2], made[1]] and first.has_more
    second = client.fine_tuning.jobs.list(limit=2, after=first.data[-1].id, metadata={"batch": "pages"})
    assert [j.id for j in second.data] == [made[0]] and not second.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"n": "1"}).data] == [made[1]]
    events = client.fine_tuning.jobs.list_events(made[0], limit=1)
    assert len(events.data) == 1 and events.has_more
    assert events.data[0].message == "Fine-tuning job cancelled"


def test_cancel_stops_training_at_once(client, uploaded):
    job = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id,
                                         hyperparameters={"n_epochs": 50, "batch_size": 4})
    wait_for(client, job.id, lambda j: j.status == "running" and j.trained_tokens, timeout=120)
    assert training_processes(job.id)
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    deadline = time.monotonic() + 10
    while training_processes(job.id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert training_processes(job.id) == []
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.pause(job.id)


def test_pause_checkpoints_and_resume_continues(client, uploaded):
    job = client.fine_tuning.jobs.create(model="tiny", training_file=uploaded.id,
                                         hyperparameters={"n_epochs": 4, "batch_size": 4},
                                         extra_body={"save_every_steps": 2})
    wait_for(client, job.id, lambda j: j.status == "running" and (j.trained_tokens or 0) > 0, timeout=120)
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    wait_for(client, job.id, lambda j: any(e.message.startswith("Paused at step")
                                           for e in all_events(client, j.id)), timeout=60)
    assert training_processes(job.id) == [] or wait_for(client, job.id, lambda j: not training_processes(j.id))
    paused_at = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id))
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"

    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    job = wait_finished(client, job.id)
    assert job.status == "succeeded", job.error
    events = all_events(client, job.id)
    assert any(e.message == f"Resuming from checkpoint step {paused_at}" for e in events)
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert sorted(steps) == list(range(1, 13))  # every step once: replayed steps are not counted twice


def test_client_cli_files_and_jobs(server, finished_job, train_file, tmp_path):
    file_id = server.cli("files", "upload", str(train_file)).stdout.strip()
    assert file_id.startswith("file-")
    assert finished_job.id in server.cli("jobs", "list").stdout.replace("\n", "")
    followed = server.cli("jobs", "follow", finished_job.id)
    assert "The job has successfully completed" in followed.stdout and finished_job.fine_tuned_model in \
        followed.stdout.replace("\n", "")

    refused = server.cli("jobs", "cancel", finished_job.id, check=False)
    assert refused.returncode == 1 and "409" in refused.stderr and "Traceback" not in refused.stderr

    rows = chat_rows(40)
    rows[2] = {"messages": [{"role": "user", "content": "unanswered " * 10}]}
    bad = write_jsonl(tmp_path / "unanswered.jsonl", rows)
    failed = server.cli("jobs", "create", "--model", "tiny", "--training-file", str(bad), "--follow", check=False)
    assert failed.returncode == 1 and "unanswered.jsonl:3" in failed.stderr.replace("\n", "")
