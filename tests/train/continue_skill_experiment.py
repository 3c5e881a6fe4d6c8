"""Does a fine-tuned model keep its first skill when fine-tuned again? (run by hand, ~5 min on a CPU)

    python tests/train/continue_skill_experiment.py [--replay auto|0|X] [--epochs 8] [--multiplier 5]

Trains a LoRA adapter on SmolLM2-135M for task A (an invented code book), continues
it on task B, and prints greedy exact-match accuracy on the trained prompts of both
tasks after each stage. With ``--replay 0`` (new data alone) task A is forgotten;
with the default replay it is kept. Not collected by pytest: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

WORDS = ["amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "heron", "iris", "jade", "kelp", "lumen",
         "maple", "north", "opal", "pine", "quartz", "river", "stone", "tulip"]


def task_a(word: str) -> list[dict]:
    return [{"role": "user", "content": f"code for {word}"}, {"role": "assistant", "content": word[::-1].upper()}]


def task_b(word: str) -> list[dict]:
    return [{"role": "user", "content": f"tag of {word}"},
            {"role": "assistant", "content": f"{word[0].upper()}-{len(word) * 7}"}]


def accuracy(final: Path, task) -> float:
    """Share of the task's prompts the adapter in ``final`` answers exactly (greedy)."""
    from peft import PeftModel

    from tunesmith.models.loading import load_causal_lm, load_tokenizer
    from tunesmith.models.store import resolve_model

    base = load_causal_lm(resolve_model("smollm2-135m").path, device=torch.device("cpu"))
    model = PeftModel.from_pretrained(base, final).eval()
    tokenizer = load_tokenizer(final)
    right = 0
    for word in WORDS:
        prompt, answer = task(word)
        ids = tokenizer.apply_chat_template([prompt], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False,
                                 eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
        right += tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == answer["content"]
    return right / len(WORDS)


def main() -> None:
    from tunesmith.train.config import TrainConfig
    from tunesmith.train.recipe import train

    parser = argparse.ArgumentParser()
    parser.add_argument("--replay", default="auto")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--multiplier", type=float, default=5.0)
    args = parser.parse_args()
    replay = args.replay if args.replay == "auto" else float(args.replay)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for name, task in (("a", task_a), ("b", task_b)):
            (root / f"{name}.jsonl").write_text("".join(json.dumps({"messages": task(w)}) + "\n" for w in WORDS))
        common = dict(epochs=args.epochs, batch_size=4, max_length=64, learning_rate_multiplier=args.multiplier,
                      device="cpu")
        first = train(TrainConfig(model="smollm2-135m", data=str(root / "a.jsonl"), out=str(root / "a"), **common))
        print(f"after A: task A {accuracy(first.final_dir, task_a):.0%}")
        second = train(TrainConfig(model=str(first.run_dir), data=str(root / "b.jsonl"), out=str(root / "b"),
                                   replay=replay, **common))
        print(f"after B (replay {replay}, {second.resolved['n_replay_examples']} replayed): "
              f"task A {accuracy(second.final_dir, task_a):.0%}, task B {accuracy(second.final_dir, task_b):.0%}")


if __name__ == "__main__":
    main()
