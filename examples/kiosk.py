"""A kiosk: answers questions from a memory bank and learns corrections while it keeps serving.

    python examples/kiosk.py --bundle bundles/default/fp32 --memory kiosk.ikv --script examples/kiosk.txt
    python examples/kiosk.py --bundle bundles/default/fp32 --memory kiosk.ikv      # type; Ctrl-D ends

Every input line (from --script FILE, else stdin) is a question, or a command:

    !fix ANSWER    the right answer to the last question: learned into the bank as one example
                   of the task "corrections", in a background thread (or inline, --inline); a full
                   bank drops its oldest entries to make room
    !wait          wait until every pending correction is in the bank
    !quit          stop (pending corrections are finished first, as at the end of the input)

Blank lines and lines starting with # are skipped. A bank that does not exist is created
(--budget, int8 entries: a kiosk's bank grows one correction at a time, and the bank-wide key
scales of the 4-bit schemes would be fitted on its first correction alone). Serving and
learning share one ``Runtime``: a question asked while a correction is being learned is
answered from the bank as it was, the next one after the commit from the bank with it.

Uses only the device-side install (``inducekv.runtime``, ``inducekv.learn``; no torch).
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
import threading

from inducekv.core.cli import parse_bytes
from inducekv.core.errors import InduceKVError
from inducekv.learn import learn_task, open_or_create
from inducekv.runtime import Runtime

TASK = "corrections"   # the bank task every correction is learned into
STRATEGY = "fifo"      # a correction is always kept (the full selection may judge it of no gain);
                       # when the bank is full, the oldest entries make room


class Kiosk:
    """Answers questions; learns corrections on one worker thread (one writer at a time)."""

    def __init__(self, rt: Runtime, memory: str, k: int | None, max_new_tokens: int, as_json: bool, inline: bool):
        self.rt, self.memory, self.k, self.max_new_tokens = rt, memory, k, max_new_tokens
        self.as_json, self.inline = as_json, inline
        self.last: str | None = None                     # the last question asked
        self._out = threading.Lock()                     # whole lines from both threads
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._worker, daemon=True).start()

    def say(self, obj: dict, text: str) -> None:
        with self._out:
            print(json.dumps(obj) if self.as_json else text, flush=True)

    def ask(self, question: str) -> None:
        r = self.rt.generate(question, k=self.k, max_new_tokens=self.max_new_tokens)
        answer = (r.text.strip().splitlines() or [""])[0]
        used = [{"task": e["task"], "id": e["id"], "score": round(e["score"], 4)} for e in r.entries]
        self.last = question
        memo = ", ".join(f"{e['task']}#{e['id']} {e['score']:.3f}" for e in used) or "none"
        self.say({"question": question, "answer": answer, "entries": used}, f"> {question}\n{answer}\n  (memory: {memo})")

    def fix(self, answer: str) -> None:
        if self.last is None:
            raise InduceKVError("!fix needs a question first")
        if not answer:
            raise InduceKVError("!fix needs the right answer: !fix ANSWER")
        example = {"prompt": self.last, "answer": answer}
        if self.inline:
            self._learn(example)
        else:
            self._jobs.put(example)

    def wait(self) -> None:
        self._jobs.join()

    def _worker(self) -> None:
        while True:
            example = self._jobs.get()
            try:
                self._learn(example)
            finally:
                self._jobs.task_done()

    def _learn(self, example: dict) -> None:
        try:
            res = learn_task(self.rt, self.memory, [example], name=TASK, strategy=STRATEGY)
        except InduceKVError as e:
            self.say({"error": str(e)}, f"error: {e}")
            return
        self.say({"learned": example, "added": res.added, "entries": res.entries, "bytes_used": res.bytes_used,
                  "cap": res.cap, "seconds": res.total_s},
                 f"learned: {example['prompt']!r} -> {example['answer']!r} "
                 f"in {res.total_s:.1f} s (bank: {res.entries} entr{'y' if res.entries == 1 else 'ies'}, "
                 f"{res.bytes_used / 1024:.0f} of {res.cap / 1024:.0f} KiB)")

    def run(self, lines) -> None:
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            cmd, _, rest = line.partition(" ")
            try:
                if cmd == "!fix":
                    self.fix(rest.strip())
                elif cmd == "!wait":
                    self.wait()
                elif cmd == "!quit":
                    break
                elif line.startswith("!"):
                    raise InduceKVError(f"unknown command {cmd}; use !fix ANSWER, !wait or !quit")
                else:
                    self.ask(line)
            except InduceKVError as e:  # bad input on one line: say so and keep serving
                self.say({"error": str(e)}, f"error: {e}")
        self.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Answer questions from a memory bank; learn corrections (!fix ANSWER).")
    ap.add_argument("--bundle", required=True, help="bundle directory (ikv-export)")
    ap.add_argument("--memory", required=True, help="bank file (.ikv); created when absent")
    ap.add_argument("--budget", default="16MiB", help="byte cap of a new bank (default 16MiB)")
    ap.add_argument("--device", default="cpu", help="device profile name or .toml path")
    ap.add_argument("--k", type=int, default=None, help="memory entries per question (default: the profile's)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--script", default=None, help="read lines from this file instead of stdin")
    ap.add_argument("--inline", action="store_true", help="learn corrections in the serving thread")
    ap.add_argument("--json", action="store_true", help="one JSON object per output line")
    args = ap.parse_args(argv)
    try:
        budget = parse_bytes(args.budget)
        rt = Runtime.open(args.bundle, device=args.device, learn=True)   # serves and learns: one weight copy
        open_or_create(args.memory, rt, budget, "int8").close()   # an empty bank to serve from, if none
        rt.memory = rt.open_memory(args.memory)
        lines = open(args.script, encoding="utf-8") if args.script else sys.stdin
    except (InduceKVError, ValueError, OSError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    with lines:
        Kiosk(rt, args.memory, args.k, args.max_new_tokens, args.json, args.inline).run(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
