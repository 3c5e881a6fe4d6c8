"""The train/export/runs commands: happy path, Ctrl-C, and bad input (one message, exit 1, nothing half-written)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tunesmith.cli as root
from tunesmith.errors import TunesmithError
from tunesmith.train.recipe import train
from tunesmith.train.runs import read_manifest
from trainhelpers import quick_config


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``tunesmith ARGS`` in this process, as the console entry point does; → (exit code, stdout, stderr)."""
    monkeypatch.setenv("COLUMNS", "200")

    def invoke(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["tunesmith", *map(str, args)])
        try:
            root.main()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


TINY_FLAGS = ["--epochs", "1", "--batch-size", "4", "--max-length", "64", "--device", "cpu", "--seed", "3"]


def test_train_then_runs_and_export(cli, tiny_model_path, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs go to ./runs by default
    code, out, err = cli("train", "--model", tiny_model_path, "--data", data_dir / "train.jsonl",
                         "--validation-split", "0.2", "--suffix", "codes", "--rslora", *TINY_FLAGS)
    assert code == 0, err
    assert "resolved hyperparameters" in out and "done" in out and "use_rslora" in out
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith(f"{tiny_model_path.name}-lora-codes-")
    manifest = read_manifest(runs[0])
    assert manifest["config"]["use_rslora"] is True and manifest["resolved"]["n_valid_examples"] == 2

    code, out, _ = cli("runs", "list")
    assert code == 0 and runs[0].name in out and "succeeded" in out
    code, out, _ = cli("runs", "show", runs[0].name)
    assert code == 0 and "final model" in out and str(runs[0] / "final") in out and "learning_rate" in out
    code, out, err = cli("export", runs[0].name, "--merged", tmp_path / "merged")
    assert code == 0, err
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_bad_settings_one_message_every_problem_nothing_written(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("train", "--model", "no-such-model", "--data", "missing.jsonl", "--epochs", "0",
                         "--method", "qlora", "--learning-rate-multiplier", "fast")
    assert code == 1
    for expected in ("model: 'no-such-model'", "data: file missing.jsonl does not exist", "epochs: 0",
                     "method: 'qlora'", "learning_rate_multiplier: must be a number or 'auto', not 'fast'"):
        assert expected in err
    assert "Traceback" not in err + out and not (tmp_path / "runs").exists()


def test_bad_data_is_reported_with_lines(cli, tiny_model_path, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n' * 6)
    code, out, err = cli("train", "--model", tiny_model_path, "--data", data, "--out", tmp_path / "run", *TINY_FLAGS)
    assert code == 1 and "bad.jsonl:2" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_not_a_run_and_unfinished_runs(cli, trained, data_dir, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    code, _, err = cli("train", "--out", plain, "--resume")
    assert code == 1 and "is not a tunesmith run" in err
    code, _, err = cli("runs", "show", plain)
    assert code == 1 and "is not a tunesmith run" in err
    code, _, err = cli("export", "no-such-run", "--merged", tmp_path / "x")
    assert code == 1 and "no run called 'no-such-run'" in err

    config, _, _ = trained("lora")
    unfinished = train(quick_config(config.model, data_dir / "train.jsonl", tmp_path / "unfinished"),
                       should_stop=lambda: "pause")
    code, out, _ = cli("runs", "show", unfinished.run_dir)
    assert code == 0 and "interrupted (pause)" in out and f"tunesmith train --out {unfinished.run_dir} --resume" in out
    code, _, err = cli("train", "--model", unfinished.run_dir, "--data", data_dir / "more.jsonl")
    assert code == 1 and "never finished" in err
    code, _, err = cli("export", unfinished.run_dir, "--merged", tmp_path / "x")
    assert code == 1 and "never finished" in err and "--resume" in err
    code, _, err = cli("train", "--out", unfinished.run_dir, "--resume", "--epochs", "9", "--seed", "1")
    assert code == 1 and "epochs: the run used 2, now 9" in err and "seed: the run used 7, now 1" in err


def test_ctrl_c_checkpoints_and_says_how_to_resume(tiny_model_path, data_dir, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "tunesmith", "train", "--model", str(tiny_model_path), "--data",
               str(data_dir / "train.jsonl"), "--out", str(out), "--epochs", "40", "--batch-size", "1",
               "--max-length", "64", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "COLUMNS": "200"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        metrics = out / "metrics.csv"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert f"resume: tunesmith train --out {out} --resume" in stdout and "Traceback" not in stderr
    manifest = read_manifest(out)
    assert manifest["status"] == "interrupted" and manifest["stop_reason"] == "SIGINT"
    step = manifest["progress"]["step"]
    assert 2 <= step < 480 and (out / "checkpoints" / f"step-{step}" / "training_state.pt").is_file()


def _mount_small_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_disk_full_is_one_clear_message_and_nothing_half_written(tiny_model_path, data_dir, tmp_path):
    small = tmp_path / "small"
    if not _mount_small_tmpfs(small, "64k"):
        pytest.skip("needs root to mount a small tmpfs that fills up")
    try:
        run_dir = small / "run"
        with pytest.raises(TunesmithError) as caught:
            train(quick_config(tiny_model_path, data_dir / "train.jsonl", run_dir))
        assert "disk is full" in caught.value.message and "--resume" in caught.value.hint
        leftovers = [p.name for p in (run_dir / "checkpoints").iterdir()] if (run_dir / "checkpoints").exists() else []
        assert leftovers == []  # no half checkpoint, no temporary folder
        assert not (run_dir / "final").exists()
        assert json.loads((run_dir / "manifest.json").read_text())["status"] in ("running", "failed")
    finally:
        subprocess.run(["umount", str(small)], check=False)
