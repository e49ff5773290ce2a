"""Learning on the device: absorb a task into a bank under its byte cap (``ikv-learn``).

The only writer of memory entries. It sits above the runtime (it runs the model to
encode and score entries) and the bank (it plans against a snapshot and commits one
transaction). An app makes one call, the one ``ikv-learn`` makes (``api.py``)::

    from inducekv.learn import learn_task
    res = learn_task(rt, "bank.ikv", "capitals.train.jsonl", budget=16 << 20,
                     progress=lambda stage, done, total: ...)     # or a list of {"prompt", "answer"} dicts, name=...
    res.added, res.evicted, res.bytes_used, res.tasks_after, res.calibration_kept

or the two steps under it::

    from inducekv.learn import open_or_create, plan, read_examples, write
    with open_or_create("bank.ikv", rt, 16 << 20, "int8") as bank:
        p = plan(rt, bank, read_examples("capitals.train.jsonl"), "capitals")   # nothing written
        write(bank, p)                                                          # one atomic commit

Modules: ``api`` (``learn_task``, ``LearnResult``), ``progress`` (bars or callbacks),
``candidates`` (phase 1), ``compact`` and ``perlayer`` (phase 1 with ``--compact``: fewer
tokens per entry; ``perlayer`` is the default), ``calibrate`` (2), ``retain`` (3), ``select`` (4), ``plan`` (the plan and the write),
``cli`` (``ikv-learn``).
"""
from inducekv.learn.api import LearnResult, learn_task
from inducekv.learn.calibrate import Calibration
from inducekv.learn.candidates import Candidate, encode_candidates
from inducekv.learn.plan import Plan, absorb, open_or_create, page_tokens, plan, read_examples, task_name, write
from inducekv.learn.select import STRATEGIES, Weights

__all__ = ["Calibration", "Candidate", "LearnResult", "Plan", "STRATEGIES", "Weights", "absorb", "encode_candidates",
           "learn_task", "open_or_create", "page_tokens", "plan", "read_examples", "task_name", "write"]
