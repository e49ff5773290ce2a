"""How likely an entry makes its answer, by where the answer is scored.

    python benchmarks/answer_framing.py --bundle bundles/default/fp32 [--tasks capitals,inventors,planets,foods]
        [--n 24] [--seed 0] [--json]

``ikv-learn`` values an entry by the log-likelihood of the answer as the first tokens of the
reply (``learn/candidates.py``, ``Scorer``). README scoring accepts the answer anywhere in the
first line, and the model often writes a sentence first ("Vuken Vebrolane's favourite food is
pasta."). This prints, per task, the mean per-token probability of each training example's
answer given its own prompt, with its entry injected and without memory, scored two ways:

    first     the answer as the reply's first tokens (what ``ikv-learn`` scores)
    lead-in   the answer after the template's own lead-in ("The answer is", the ``facts``
              template's words before ``{answer}``), scored as the tokens after it

Same entries (compacted as ``ikv-learn`` compacts them), same prompts; the only change is
where the answer is read. ``--n`` examples per task, a seeded sample of its train file.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE / "continual"), str(HERE.parent / "examples")]

import methods as M  # noqa: E402
from inducekv.learn.candidates import Scorer, lead_of, unpack  # noqa: E402
from inducekv.memory.bank import Bank  # noqa: E402
from inducekv.runtime.memory import Layout, template_from  # noqa: E402
from inducekv.runtime.tasks import iter_task  # noqa: E402

TASKS = HERE.parent / "examples" / "tasks"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="bundles/default/fp32")
    ap.add_argument("--tasks", default="capitals,inventors,planets,foods")
    ap.add_argument("--n", type=int, default=24, help="examples per task (a seeded sample of its train file)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    examples = {}
    for name in args.tasks.split(","):
        rows = list(iter_task(TASKS / f"{name}.train.jsonl"))
        examples[name] = [rows[i] for i in sorted(rng.permutation(len(rows))[:args.n])]
    rt = M.runtime(args.bundle)
    template, policy = template_from(None)
    layout, tok = Layout(rt, template, policy), rt.tokenizer
    scorer, lead = Scorer(rt, layout), lead_of(template)
    with tempfile.TemporaryDirectory() as work:
        cands = M.encode(args.bundle, Path(work), examples)
        scheme = "f16s" if "f16s" in next(iter(cands.values())) else "fp16"
        with Bank.create_for(Path(work) / "g.ikv", 4 << 20, rt.manifest, scheme=scheme, force=True,
                             max_tokens=192) as b:
            geo = b.geo

    def answer_logp(prompt: str, answer: str, entries) -> float:
        """Summed log p of the answer's tokens after the lead-in (the lead-in's own tokens not counted)."""
        full, head = f"{lead} {answer}", lead
        n_full, n_head = len(tok.encode(full, bos=False)), len(tok.encode(head, bos=False))
        return scorer.logp(prompt, full, entries) * n_full - scorer.logp(prompt, head, entries) * n_head

    out = {"bundle": args.bundle, "lead": lead, "n": args.n, "seed": args.seed, "scheme": scheme, "tasks": {}}
    print(f"per-token answer probability, mean over {args.n} examples a task (lead-in: {lead!r})")
    print(f"{'task':10s} {'first, entry':>13s} {'first, none':>12s} {'lead-in, entry':>15s} {'lead-in, none':>14s}")
    for name, cs in cands.items():
        rows = []
        for c in cs[scheme]:
            entry = [unpack(geo, c.payload, c.tokens)]
            n_ans = len(tok.encode(f"{lead} {c.answer}", bos=False)) - len(tok.encode(lead, bos=False))
            rows.append([np.exp(scorer.logp(c.prompt, c.answer, entry)), np.exp(c.base),
                         np.exp(answer_logp(c.prompt, c.answer, entry) / max(n_ans, 1)),
                         np.exp(answer_logp(c.prompt, c.answer, []) / max(n_ans, 1))])
        m = np.array(rows).mean(axis=0)
        out["tasks"][name] = dict(zip(["first_entry", "first_none", "lead_entry", "lead_none"], map(float, m)))
        print(f"{name:10s} {m[0]:13.3f} {m[1]:12.3f} {m[2]:15.3f} {m[3]:14.3f}")
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
