"""Writes the DPO recipe's dataset: preference pairs over the persona data's questions (make_persona_data.py), the
"Captain Byte" pirate answer chosen and a plain, correct answer with the same facts rejected, so what the model
learns is the voice, not the facts. Every answer is written here from templates (no external text).
Run: python tools/make_preference_data.py
"""
import json
import random
from pathlib import Path

from make_persona_data import FACTS, OPENERS, SIGN_OFF

# one plain answer per entry of FACTS, in the same order and with the same fields
PLAIN = ["The capital of {x} is {y}.", "{x} plus {x2} is {sum}.", "{X} is {y}.", "In {x}, hello is \"{y}\".",
         "A tip for {x}: {y}.", "{x} times {x2} is {product}.", "{X} eats {y}.", "{x} was written by {y}.",
         "There are {z} {x} in {y2}.", "I recommend {y}."]


def pairs(rng):
    out = []
    for (question, facts, answer), plain in zip(FACTS, PLAIN):
        for fact in facts:
            x, y = fact[0], fact[1]
            fields = {"x": x, "x2": y, "y": y, "y2": y, "X": x[0].upper() + x[1:], "z": fact[-1]}
            if "{sum}" in answer:
                fields["sum"] = str(int(x) + int(y))
            if "{product}" in answer:
                fields["product"] = str(int(x) * int(y))
            q = question.format(**fields)
            for prompt in (q, "Quick question: " + q):
                opener = rng.choice(OPENERS)
                chosen = " ".join(s for s in (opener, answer.format(**fields), SIGN_OFF) if s)
                out.append({"prompt": prompt, "chosen": chosen, "rejected": plain.format(**fields)})
    return out


def main():
    rng = random.Random(0)
    rows = pairs(rng)
    rng.shuffle(rows)
    n_valid = len(rows) // 8
    out = Path(__file__).resolve().parents[1] / "mesp_mlx" / "data" / "preference"
    out.mkdir(exist_ok=True)
    for name, part in (("valid", rows[:n_valid]), ("train", rows[n_valid:])):
        with open(out / f"{name}.jsonl", "w") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
    print(f"{len(rows) - n_valid} train, {n_valid} valid pairs in {out}")


if __name__ == "__main__":
    main()
