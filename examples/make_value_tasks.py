"""Made-up fact tasks whose training examples differ in value (seeded, no network).

    python examples/make_value_tasks.py --out /tmp/value --seed 0 [--facts 30]

Selection is only worth something when examples differ in what they are worth per
byte. Each task here is one way they differ; ``NAME.train.jsonl`` is what a learn sees,
``NAME.test.jsonl`` asks every fact once with a test paraphrase, ``NAME.dev.jsonl``
asks it again with the other test paraphrase (a held-out split for choosing defaults;
no prompt is shared between the three files):

- ``dup-inventors``: each fact stated 1 to 5 times, in different words (duplicates:
  a second statement of a fact is worth little once one is kept);
- ``known-capitals``: made-up capitals mixed with real ones a small model already
  knows (an entry for "the capital of France" is worth nothing);
- ``verbose-planets``: each fact twice, once terse and once in a long sentence with
  the same answer (the terse one is worth the same in fewer bytes);
- ``noisy-colours``: each fact stated 3 times; for 30% of the facts one statement
  has a wrong colour (label noise: that entry is worth less than nothing).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from make_tasks import COLOURS, TASKS, Namer, facts

# real capitals (in the test templates' phrasing a bare SmolLM2-135M answers most of these)
REAL_CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
                 ("Spain", "Madrid"), ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"),
                 ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
                 ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Canada", "Ottawa"),
                 ("Kenya", "Nairobi"), ("Thailand", "Bangkok"), ("Turkey", "Ankara"), ("Argentina", "Buenos Aires")]
MORE_TRAIN = {   # two more training phrasings per task, for facts stated up to 5 times
    "inventors": ["Tell me who invented the {x}.", "The inventor of the {x} is who?"],
    "capitals": ["Tell me the capital of {x}.", "Which city is the seat of government of {x}?"],
    "planets": ["Tell me the home planet of {x}.", "On which planet was {x} born?"],
    "colours": ["Tell me the colour of the {x}.", "What colour does the {x} have?"],
}
VERBOSE = ("Please answer in a full sentence, with a little background: {q}",
           "As far as the records of the old archive show, and after long study by many scholars, the answer is {a}.")
VARIANTS = {"dup-inventors": "inventors", "known-capitals": "capitals", "verbose-planets": "planets",
            "noisy-colours": "colours"}
NOISE = 0.3


def _row(prompt: str, answer: str) -> dict:
    return {"prompt": prompt, "answer": answer}


def make(variant: str, n: int, name: Namer, rng: random.Random) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, test, dev) rows of one task."""
    base = VARIANTS[variant]
    train_t, test_t = TASKS[base]
    train_t = train_t + MORE_TRAIN[base]
    pairs = facts(base, n, name, rng)
    if variant == "known-capitals":
        pairs = pairs[: n - n // 2] + rng.sample(REAL_CAPITALS, n // 2)
        rng.shuffle(pairs)
    train = []
    for x, a in pairs:
        if variant == "dup-inventors":
            train += [_row(t.format(x=x), a) for t in rng.sample(train_t, rng.randint(1, 5))]
        elif variant == "verbose-planets":
            q = rng.choice(train_t).format(x=x)
            train += [_row(q, a), _row(VERBOSE[0].format(q=rng.choice(train_t).format(x=x)), VERBOSE[1].format(a=a))]
        elif variant == "noisy-colours":
            said = [_row(t.format(x=x), a) for t in rng.sample(train_t, 3)]
            if rng.random() < NOISE:
                said[rng.randrange(3)]["answer"] = rng.choice([c for c in COLOURS if c != a])
            train += said
        else:
            train.append(_row(rng.choice(train_t).format(x=x), a))
    rng.shuffle(train)
    order = [rng.sample(test_t, 2) for _ in pairs]
    test = [_row(t[0].format(x=x), a) for t, (x, a) in zip(order, pairs)]
    dev = [_row(t[1].format(x=x), a) for t, (x, a) in zip(order, pairs)]
    return train, test, dev


def write_all(out: Path, seed: int, n: int = 30) -> dict[str, Path]:
    """Write every variant's three files under ``out``; returns {task: train file}."""
    rng = random.Random(seed)
    name = Namer(rng)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for variant in VARIANTS:
        for split, rows in zip(("train", "test", "dev"), make(variant, n, name, rng)):
            p = out / f"{variant}.{split}.jsonl"
            p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[variant] = out / f"{variant}.train.jsonl"
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--facts", type=int, default=30, help="facts per task")
    args = ap.parse_args()
    if args.facts < 2:
        ap.error("need --facts >= 2")
    for task, path in write_all(args.out, args.seed, args.facts).items():
        n = sum(1 for _ in open(path))
        print(f"{task}: {n} train lines, {args.facts} test, {args.facts} dev questions -> {path.parent}")


if __name__ == "__main__":
    main()
