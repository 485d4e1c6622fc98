"""Writes the KTO recipe's dataset: the DPO recipe's preference pairs (mesp_mlx/data/preference, written by
make_preference_data.py) unpaired into single answers marked good or bad, TRL's unpaired format
{"prompt", "completion", "label"}. Each prompt appears once: the pairs of each split in file order give by turns
their chosen ("Captain Byte" pirate) answer with label true, and a wrong answer with label false: the plain answer
of the next such pair's prompt (answering "What is the capital of France?" with "A whale eats krill."), what a user
marks down. Half of each split is desirable and half not. A plain correct answer is never marked bad: the model is to
gain the voice, not to lose its facts (marking "The capital of France is Paris." down as the DPO pairs' rejected
side does taught KTO to avoid right answers: the retention check fell from 7/10 to 1/10).
Run: python tools/make_kto_data.py
"""
import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "mesp_mlx" / "data"


def unpair(pairs):
    """Pairs -> KTO rows, one per pair: the chosen answer (label true) for pairs 0, 2, 4, ..., and for pairs 1, 3,
    5, ... the rejected answer of the next odd pair whose answer differs from its own ("Quick question: X" and "X"
    share one; label false; the last wraps around to the first)."""
    odd = list(range(1, len(pairs), 2))

    def off_topic(j):
        own = pairs[odd[j]]["rejected"]
        return next(a for a in (pairs[odd[(j + s) % len(odd)]]["rejected"] for s in range(1, len(odd))) if a != own)
    wrong = {k: off_topic(j) for j, k in enumerate(odd)}
    return [{"prompt": p["prompt"], "completion": p["chosen"] if k % 2 == 0 else wrong[k], "label": k % 2 == 0}
            for k, p in enumerate(pairs)]


def main():
    out = DATA / "kto"
    out.mkdir(exist_ok=True)
    for split in ("train", "valid"):
        pairs = [json.loads(line) for line in (DATA / "preference" / f"{split}.jsonl").read_text().splitlines()
                 if line.strip()]
        rows = unpair(pairs)
        with open(out / f"{split}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"{split}: {len(rows)} rows ({sum(r['label'] for r in rows)} desirable) in {out}")


if __name__ == "__main__":
    main()
