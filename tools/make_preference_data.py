"""Writes the DPO recipe's dataset: preference pairs over the persona data's questions (make_persona_data.py), the
"Captain Byte" pirate answer chosen and a plain, correct answer with the same facts rejected, so what the model
learns is the voice, not the facts. Every answer is written here from templates (no external text).
Run: python tools/make_preference_data.py
"""
import random

from make_persona_data import FACTS, OPENERS, SIGN_OFF, template_fields, write_splits

# one plain answer per entry of FACTS, in the same order and with the same fields
PLAIN = ["The capital of {x} is {y}.", "{x} plus {x2} is {sum}.", "{X} is {y}.", "In {x}, hello is \"{y}\".",
         "A tip for {x}: {y}.", "{x} times {x2} is {product}.", "{X} eats {y}.", "{x} was written by {y}.",
         "There are {z} {x} in {y2}.", "I recommend {y}."]


def pairs(rng):
    out = []
    for (question, facts, answer), plain in zip(FACTS, PLAIN):
        for fact in facts:
            fields = template_fields(fact, answer)
            q = question.format(**fields)
            for prompt in (q, "Quick question: " + q):
                opener = rng.choice(OPENERS)
                chosen = " ".join(s for s in (opener, answer.format(**fields), SIGN_OFF) if s)
                out.append({"prompt": prompt, "chosen": chosen, "rejected": plain.format(**fields)})
    return out


def main():
    rng = random.Random(0)
    write_splits(pairs(rng), "preference", rng)

if __name__ == "__main__":
    main()
