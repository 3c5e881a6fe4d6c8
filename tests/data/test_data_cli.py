"""`tunesmith data check|convert` as a user runs them: exit codes, messages, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from datafiles import good_records

from tunesmith.data import load_examples
from tunesmith.data.convert import convert_file
from tunesmith.errors import DataError


def tunesmith(*args: str, cwd=None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "tunesmith", *args], capture_output=True, text=True,
                            timeout=300, cwd=cwd)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    return result


def test_check_accepts_a_good_file(write, tiny_model_path):
    result = tunesmith("data", "check", str(write("t.jsonl", good_records(12))), "--model", str(tiny_model_path))
    assert result.returncode == 0, result.stderr
    assert "12 examples, OpenAI chat" in result.stdout and "ready to train" in result.stdout
    assert "trainable tokens" in result.stdout and "estimated training time" in result.stdout


def test_check_rejects_bad_files_at_their_line(write, tiny_model_path):
    lines = [json.dumps(r) for r in good_records(12)]
    lines[6] = '{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}'
    lines[8] = "\xff"  # written as UTF-8, so valid; the next line is not
    path = write("t.jsonl", "\n".join(lines).encode().replace(b"\xc3\xbf", b"\xff"))
    result = tunesmith("data", "check", str(path), "--model", str(tiny_model_path))
    assert result.returncode == 1
    assert f'{path}:7: messages[1].role: unknown role "bot"' in result.stdout
    assert f"{path}:9: not valid UTF-8 (byte 0xff at column 1)" in result.stdout
    assert "2 errors" in result.stdout


def test_check_json_output_and_binary_file(write, tiny_model_path):
    path = write("t.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    result = tunesmith("data", "check", str(path), "--model", str(tiny_model_path), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["error_count"] == 1
    assert report["errors"][0].startswith(f"{path}:3: binary data (a NUL byte at byte 9)")


def test_missing_file_exits_1_without_traceback(tmp_path):
    result = tunesmith("data", "check", str(tmp_path / "nope.jsonl"))
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_convert_writes_openai_chat_and_refuses_bad_input(write, tmp_path):
    source = write("t.csv", "prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(10)))
    out = tmp_path / "out" / "train.jsonl"
    result = tunesmith("data", "convert", str(source), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "10 examples (prompt/completion → OpenAI chat)" in result.stdout
    assert json.loads(out.read_text().splitlines()[3]) == {
        "messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]}
    assert [e.messages for e in load_examples(out)] == [e.messages for e in load_examples(source)]

    bad = write("bad.jsonl", good_records(9))
    with pytest.raises(DataError, match="1 problem"):
        convert_file(bad, tmp_path / "bad-out.jsonl")
    assert not (tmp_path / "bad-out.jsonl").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bad-out")] == []
