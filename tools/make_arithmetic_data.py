"""Writes the GRPO recipe's task: arithmetic questions with their answers, a verifiable reward offline. Each row is
{"prompt": "What is 7 + 12? Answer with just the number.", "answer": "19"}: sums and
differences of numbers 1-20 and products of numbers 1-9, drawn with a fixed seed, train and valid disjoint.
Run: python tools/make_arithmetic_data.py
"""
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "mesp_mlx" / "data" / "arithmetic"
INSTRUCTION = "Answer with just the number."


def questions(seed=0):
    """Every question once, shuffled: (text, answer)."""
    qs = [(f"{a} + {b}", a + b) for a in range(1, 21) for b in range(1, 21)]
    qs += [(f"{a} - {b}", a - b) for a in range(1, 21) for b in range(1, a + 1)]
    qs += [(f"{a} times {b}", a * b) for a in range(1, 10) for b in range(1, 10)]
    random.Random(seed).shuffle(qs)
    return qs


def main(n_train=256, n_valid=32):
    OUT.mkdir(parents=True, exist_ok=True)
    qs = questions()
    for split, part in (("train", qs[:n_train]), ("valid", qs[n_train:n_train + n_valid])):
        with open(OUT / f"{split}.jsonl", "w") as f:
            for q, a in part:
                f.write(json.dumps({"prompt": f"What is {q}? {INSTRUCTION}", "answer": str(a)}) + "\n")
        print(f"{split}: {len(part)} questions in {OUT}")


if __name__ == "__main__":
    main()
