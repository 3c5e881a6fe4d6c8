"""Write the example datasets: python examples/make_examples.py

Each task is generated deterministically (same seed, same bytes) and split into
train/held-out files with tunesmith's own stratified split:

- bank-intents/: a bank customer's message -> one of 12 intents (classification).
- order-extraction/: an order message -> the house JSON schema (structured extraction).
- ticket-codes/: a support ticket -> an invented internal routing code (8 classes; the demo's task).
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.eval.split import split_examples
from tunesmith.eval.synthetic import TASKS, write_jsonl

HERE = Path(__file__).resolve().parent
# task: (examples, held-out count, seed)
PLAN = {
    "bank-intents": (336, 96, 11),
    "order-extraction": (160, 40, 12),
    "ticket-codes": (240, 80, 13),
}


def main() -> None:
    for task, (count, heldout, seed) in PLAN.items():
        split = split_examples(TASKS[task](count, seed), heldout, seed=seed)
        folder = HERE / task
        write_jsonl(folder / "train.jsonl", split.train)
        write_jsonl(folder / "heldout.jsonl", split.heldout)
        print(f"{task}: {len(split.train)} train, {len(split.heldout)} held-out -> {folder}")


if __name__ == "__main__":
    main()
