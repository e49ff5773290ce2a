"""Generate made-up fact tasks for continual learning (seeded, no network).

    python examples/make_tasks.py --out examples/tasks --seed 0

Each task is NAME.train.jsonl (one line per fact) and NAME.test.jsonl (a sample
of the same facts asked with different paraphrase templates, so no test prompt
is a training prompt). Invented names are built from syllables, so a small
chat model cannot know the answers without memory.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ONSETS = "b d f g k l m n p r s t v z br dr kr tr st th sh".split()
VOWELS = "a e i o u".split()
CODAS = "n r l s m k x th".split()
COLOURS = "red blue green yellow orange purple pink black white brown silver golden".split()
FOODS = ("mango rice cheese noodles lentils soup bread dumplings curry pancakes olives figs plums tofu pasta "
         "pizza sushi tacos chocolate honey").split()
# real words and names the syllables can spell
REAL = {"sharon", "doris", "boris", "maria", "dora", "stella", "tina", "venus", "mars", "ceres", "titan", "triton",
        "troll", "total", "metal", "panel", "salon", "baron", "sister", "tension", "mission", "nano", "zika"}

# task: (training templates, test templates); `facts` makes the subjects and answers
TASKS = {
    "capitals": (["What is the capital of {x}?", "Name the capital city of {x}.", "What city is the capital of {x}?"],
                 ["Which city is {x}'s capital?", "{x} has its capital in which city?"]),
    "inventors": (["Who invented the {x}?", "Who is the inventor of the {x}?", "Name the person who invented the {x}."],
                  ["The {x} was invented by whom?", "Whose invention is the {x}?"]),
    "colours": (["What colour is the {x}?", "What is the colour of a {x}?", "Name the colour of the {x}."],
                ["Which colour does a {x} have?", "A {x} is what colour?"]),
    "planets": (["What is {x}'s home planet?", "Which planet does {x} come from?", "Name the home planet of {x}."],
                ["{x} was born on which planet?", "Where is {x} from? Name the planet."]),
    "foods": (["What is {x}'s favourite food?", "Name the favourite food of {x}.", "What food does {x} like best?"],
              ["Which food does {x} love most?", "{x}'s favourite thing to eat is what?"]),
}


class Namer:
    """Pronounceable invented names, unique across all tasks."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def __call__(self, endings: str, syllables=(2, 2, 3)) -> str:
        rng = self.rng
        while True:
            ending = rng.choice(endings.split("|"))
            root = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.choice(syllables)))
            if ending[:1] in VOWELS or rng.random() < 0.4:  # close the last syllable before a vowel ending
                root += rng.choice(CODAS)
            name = (root + ending).capitalize()
            if name.lower() not in self.used and name.lower() not in REAL and len(name) <= 12:
                self.used.add(name.lower())
                return name


def facts(task: str, n: int, name: Namer, rng: random.Random) -> list[tuple[str, str]]:
    """n (subject, answer) pairs with distinct subjects."""
    if task == "capitals":
        return [(name("land|ia|mar|dor|esh"), name("|ton|holm|ora|ek")) for _ in range(n)]
    if task == "inventors":
        return [(name("scope|tron|phone|meter|graph").lower(), name("ski|ani|sen|ez|ov")) for _ in range(n)]
    if task == "colours":
        return [(name("|ling|ox|ard|ip").lower(), rng.choice(COLOURS)) for _ in range(n)]

    def person() -> str:
        return f"{name('a|o|en|ir', (1, 2))} {name('ek|ov|ane|ith', (1, 2))}"

    if task == "planets":
        planets = [name("is|on|ara|ux") for _ in range(max(4, n // 5))]
        return [(person(), rng.choice(planets)) for _ in range(n)]
    return [(person(), rng.choice(FOODS)) for _ in range(n)]


def lines(pairs, templates, rng: random.Random) -> list[str]:
    return [json.dumps({"prompt": rng.choice(templates).format(x=s), "answer": a}) + "\n" for s, a in pairs]


def write_long(out: Path, seed: int, n: int, rounds: int = 2) -> list[str]:
    """The long sequence: ``rounds`` rounds of every task kind, each round about fresh invented
    names (one ``Namer``: no name twice), ``n`` facts per task. ``KIND-R.train.jsonl`` states
    each fact once (training templates), ``KIND-R.test.jsonl`` asks each once (test
    templates). Returns the task names in sequence order."""
    rng = random.Random(seed)
    name = Namer(rng)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for r in range(1, rounds + 1):
        for task, (train_t, test_t) in TASKS.items():
            pairs = facts(task, n, name, rng)
            stem = f"{task}-{r}"
            (out / f"{stem}.train.jsonl").write_text("".join(lines(pairs, train_t, rng)))
            (out / f"{stem}.test.jsonl").write_text("".join(lines(pairs, test_t, rng)))
            names.append(stem)
    return names


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("examples/tasks"), help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=200, help="facts (training lines) per task")
    ap.add_argument("--test", type=int, default=50, help="test lines per task, a sample of the training facts")
    args = ap.parse_args()
    if not 1 <= args.test <= args.train:
        ap.error("need 1 <= --test <= --train")
    rng = random.Random(args.seed)
    name = Namer(rng)
    args.out.mkdir(parents=True, exist_ok=True)
    for task, (train_t, test_t) in TASKS.items():
        pairs = facts(task, args.train, name, rng)
        train, test = lines(pairs, train_t, rng), lines(rng.sample(pairs, args.test), test_t, rng)
        assert not set(train) & set(test), task
        (args.out / f"{task}.train.jsonl").write_text("".join(train))
        (args.out / f"{task}.test.jsonl").write_text("".join(test))
        print(f"{task}: {len(train)} train, {len(test)} test  e.g. {test[0].strip()}")
    (args.out / "README.md").write_text(
        f"Made-up fact tasks from `python examples/make_tasks.py --out {args.out} --seed {args.seed}` "
        f"(deterministic: same seed, same files).\n"
        f"Each `NAME.train.jsonl` has {args.train} facts about invented names; `NAME.test.jsonl` asks {args.test} "
        f"of the same facts with other paraphrases (no prompt is shared).\n"
        f"Tasks: {', '.join(TASKS)}. Answers are single words (invented names, colours, foods).\n")


if __name__ == "__main__":
    main()
