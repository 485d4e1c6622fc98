"""Writes the KTO recipe's dataset: the DPO recipe's preference pairs (mesp_mlx/data/preference, written by
make_preference_data.py) unpaired into single answers marked good or bad, TRL's unpaired format
{"prompt", "completion", "label"}. Each prompt appears once: the pairs of each split in file order give their
chosen ("Captain Byte" pirate) answer with label true and their rejected (plain) answer with label false by turns,
so half of each split is desirable and half not, and no prompt is seen with both answers.
Run: python tools/make_kto_data.py
"""
import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "mesp_mlx" / "data"


def unpair(pairs):
    """Pairs -> KTO rows, one per pair: the chosen answer (label true) for pairs 0, 2, 4, ..., the rejected one
    (label false) for pairs 1, 3, 5, ..."""
    return [{"prompt": p["prompt"], "completion": p["chosen"] if k % 2 == 0 else p["rejected"], "label": k % 2 == 0}
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
