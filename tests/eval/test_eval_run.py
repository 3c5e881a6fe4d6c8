"""Evaluation end to end on a tiny fine-tuned run: reports written, CLI, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.eval.split import split_examples
from tunesmith.eval.synthetic import TASKS, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("eval-data")
    split = split_examples(TASKS["ticket-codes"](32, 3), 8, seed=1)
    return write_jsonl(folder / "train.jsonl", split.train), write_jsonl(folder / "heldout.jsonl", split.heldout)


@pytest.fixture(scope="module")
def tiny_run(tiny_model_path, task_files, tmp_path_factory) -> Path:
    from tunesmith.train.config import TrainConfig
    from tunesmith.train.recipe import train

    out = tmp_path_factory.mktemp("runs") / "tiny-lora"
    result = train(TrainConfig(model=str(tiny_model_path), data=str(task_files[0]), method="lora", epochs=1,
                               batch_size=4, max_length=96, drop_system=True, out=str(out)))
    assert result.status == "succeeded"
    return Path(result.run_dir)


def test_eval_on_a_tiny_run_writes_reports(tiny_run, task_files, tmp_path):
    from tunesmith.eval.plan import plan_eval
    from tunesmith.eval.report import write_report
    from tunesmith.eval.runner import evaluate

    plan = plan_eval(tuned=str(tiny_run), base=None, baselines=[], shots=2, examples_from=None)
    assert plan.examples_from == task_files[0]  # taken from the run's manifest
    assert [c.mode for c in plan.contenders] == ["tuned", "prompted"]
    seen = []
    result = evaluate(plan.contenders, task_files[1], shots=2, examples_from=plan.examples_from,
                      progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert result.metric == "choice" and len(result.cases) == 8 and len(result.shots) == 2
    assert seen[-1] == ("answering", 16, 16)
    tuned, base = result.results
    assert tuned.drop_system
    # the tuned model is asked the bare ticket; the base gets instructions and two worked examples
    assert tuned.summary()["prompt_tokens_mean"] < 0.5 * base.summary()["prompt_tokens_mean"]
    payload = write_report(result, tmp_path, str(task_files[1]))
    for name in ("report.json", "report.md", "comparison.png", "confusion.png"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["metric"] == "choice" and len(saved["models"]) == 2 and len(saved["answers"]) == 8
    assert saved["relative"][0]["prompt_tokens_saved"] > 0.5
    low, score, high = (saved["models"][0][k] for k in ("ci_low", "score", "ci_high"))
    assert low <= score <= high
    assert "| model |" in (tmp_path / "report.md").read_text()
    assert payload["charts"] == ["comparison.png", "confusion.png"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tunesmith", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_eval_cli_end_to_end(tiny_run, task_files, tmp_path):
    done = _cli("eval", "--tuned", str(tiny_run), "--data", str(task_files[1]), "--shots", "1",
                "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "fewer prompt tokens" in " ".join(done.stdout.split())  # the terminal may wrap lines
    assert (tmp_path / "report" / "report.md").is_file()


def test_cli_bad_input_exits_1_without_traceback(task_files, tmp_path):
    missing = _cli("eval", "--tuned", "no-such-run", "--data", str(task_files[1]), cwd=tmp_path)
    assert missing.returncode == 1
    assert "error:" in missing.stderr and "Traceback" not in missing.stderr
    bad_metric = _cli("eval", "--tuned", "x", "--data", str(task_files[1]), "--metric", "bleu", cwd=tmp_path)
    assert bad_metric.returncode == 1 and "unknown metric" in bad_metric.stderr
    assert "Traceback" not in bad_metric.stderr
    no_chat = _cli("chat", str(tmp_path / "nothing-here"), "--prompt", "hi", cwd=tmp_path)
    assert no_chat.returncode == 1 and "Traceback" not in no_chat.stderr


def test_data_split_command(task_files, tmp_path):
    done = _cli("data", "split", str(task_files[0]), "--heldout", "0.25", "--train-out", str(tmp_path / "a.jsonl"),
                "--heldout-out", str(tmp_path / "b.jsonl"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 18
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 6
    assert "stratified over 8 labels" in " ".join(done.stdout.split())


def test_bundled_demo_data_is_what_the_generator_writes(tmp_path):
    from tunesmith.eval import demo

    written = demo.write_demo_data(tmp_path)
    assert written.train.read_bytes() == demo.TRAIN_FILE.read_bytes()
    assert written.heldout.read_bytes() == demo.HELDOUT_FILE.read_bytes()


def test_compare_trains_each_method_and_recommends(tiny_model_path, task_files, tmp_path):
    from tunesmith.eval.compare import CompareSettings, compare

    settings = CompareSettings(data=str(task_files[0]), validation=str(task_files[1]), methods=["lora", "full"],
                               model=str(tiny_model_path), shots=1, epochs=1, max_length=96, out=str(tmp_path))
    payload = compare(settings)
    rows = {row["method"]: row for row in payload["methods"]}
    assert set(rows) == {"lora", "full"}
    assert rows["full"]["trainable_parameters"] > rows["lora"]["trainable_parameters"] > 0
    assert rows["full"]["artefact_bytes"] > rows["lora"]["artefact_bytes"]
    for row in rows.values():
        assert row["wall_time_s"] > 0 and row["tokens_per_second"] > 0 and row["peak_memory_bytes"] > 0
        assert row["valid_loss"] is not None
    assert payload["recommendation"].startswith("use ")
    for name in ("report.md", "report.json", "loss_curves.png", "comparison.png"):
        assert (tmp_path / name).is_file(), name
    assert "## Methods compared" in (tmp_path / "report.md").read_text()


def test_compare_settings_report_every_problem(task_files):
    from tunesmith.errors import ConfigError
    from tunesmith.eval.compare import CompareSettings

    with pytest.raises(ConfigError) as info:
        CompareSettings(data="missing.jsonl", validation=str(task_files[1]), methods=["lora", "qlora9"],
                        metric="bleu").validate()
    assert len(info.value.problems) == 3


def test_engine_resolves_every_form_of_a_run(tiny_run, tiny_model_path):
    from tunesmith.infer import Engine, GenerationSettings, locate
    from tunesmith.infer.chat_defaults import default_system_prompt

    checkpoint = sorted((tiny_run / "checkpoints").iterdir())[-1]
    sources = [locate(str(tiny_run)), locate(str(tiny_run / "final")), locate(str(checkpoint))]
    for source in sources:
        assert source.kind == "adapter" and source.drop_system
        assert source.base_path.resolve() == Path(tiny_model_path).resolve()
        assert source.run_path == tiny_run.resolve()
    assert default_system_prompt(sources[0])[0] is None  # trained without it: none by default
    engine = Engine(device="cpu")
    messages = [{"role": "user", "content": "My card was charged twice."}]
    settings = GenerationSettings(max_tokens=6)
    answers = {engine.chat(str(ref), messages, settings).text for ref in (tiny_run, tiny_run / "final")}
    assert len(answers) == 1 and len(engine._bases) == 1
    assert engine.count_prompt_tokens(str(tiny_run), messages) == len(engine.prompt_ids(str(tiny_run), messages))


def test_chat_cli_answers_once_from_flag_and_stdin(tiny_run, tmp_path):
    from tunesmith.infer import Engine, GenerationSettings

    expected = Engine(device="cpu").chat(str(tiny_run), [{"role": "user", "content": "hello"}],
                                         GenerationSettings(max_tokens=5)).text
    done = _cli("chat", str(tiny_run), "--prompt", "hello", "--max-tokens", "5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    piped = subprocess.run([sys.executable, "-m", "tunesmith", "chat", str(tiny_run), "-n", "5"], input="hello\n",
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0 and piped.stdout == expected + "\n"
