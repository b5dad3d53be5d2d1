"""Regenerate qmilora/data/demo_alpaca.jsonl: 300 small instruction rows whose answers are correct by
construction (arithmetic, word and list manipulation). Written for QMiLoRA; public domain (CC0).

    python scripts/make_demo_data.py
"""
import json
import os
import random

WORDS = ("apple river mountain cloud garden window silver forest candle harbor meadow lantern pebble orchard "
         "thunder violet copper island saddle whisper").split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()


def rows(rng: random.Random):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    yield {"instruction": f"What is {a} + {b}?", "input": "", "output": f"{a} + {b} = {a + b}."}
    yield {"instruction": f"What is {a} times {b % 12 + 1}?", "input": "", "output": f"{a} × {b % 12 + 1} = {a * (b % 12 + 1)}."}
    words = rng.sample(WORDS, 4)
    yield {"instruction": "Sort these words alphabetically.", "input": ", ".join(words), "output": ", ".join(sorted(words))}
    w = rng.choice(WORDS)
    yield {"instruction": "Spell this word backwards.", "input": w, "output": w[::-1]}
    nums = rng.sample(range(1, 100), 5)
    yield {"instruction": "Which is the largest number in the list?", "input": " ".join(map(str, nums)),
           "output": f"The largest number is {max(nums)}."}
    d, k = rng.randrange(7), rng.randint(1, 6)
    yield {"instruction": f"What day is it {k} days after {DAYS[d]}?", "input": "",
           "output": f"{k} days after {DAYS[d]} it is {DAYS[(d + k) % 7]}."}


def main() -> None:
    rng = random.Random(0)
    out = [r for _ in range(50) for r in rows(rng)]
    path = os.path.join(os.path.dirname(__file__), "..", "qmilora", "data", "demo_alpaca.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in out)
    print(f"wrote {len(out)} rows to {os.path.normpath(path)}")


if __name__ == "__main__":
    main()
