"""One ``Runtime`` with memory served from several threads, and learning while it serves.

Outputs are compared exactly (token ids, entry ids and scores) with sequential calls on
the torch-free tiny bundle; no test measures time.
"""
from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from inducekv.memory.bank import Bank
from inducekv.runtime.api import Runtime
from learnutil import add_all

OLD = [{"prompt": f"What is the code of item {i}?", "answer": f"code{i}"} for i in range(6)]
NEW = [{"prompt": f"Which colour is the flag of land {i}?", "answer": ["red", "teal", "gold"][i % 3]} for i in range(6)]
PROMPTS = ([f"What is the code of item {i}?" for i in range(6)] + [f"Which colour is the flag of land {i}?" for i in range(6)]
           + ["Tell me the code of item 4.", "Flag colour of land 2?"])
THREADS = 4


def _answer(rt, prompt: str, k: int = 2):
    """What a call returns that must not depend on threads: tokens, retrieved entries, scores."""
    r = rt.generate(prompt, k=k, max_new_tokens=6, ignore_eos=True)
    return tuple(r.token_ids), tuple((e["id"], e["task"], e["score"], round(e["weight"], 6)) for e in r.entries)


@pytest.fixture(scope="module")
def bank_path(device_bundle, tmp_path_factory):
    """A bank of the OLD facts, with a weighting (tau) so injected entries carry a bias."""
    from inducekv.runtime.memory import INJECTION_KEY, Injection

    path = tmp_path_factory.mktemp("threads") / "old.ikv"
    rt = Runtime.open(device_bundle)
    with Bank.create_for(path, 1 << 20, rt.manifest, scheme="int8", max_tokens=64) as b:
        add_all(rt, b, OLD, "codes")
        with b.transaction() as tx:
            tx.set_extra(INJECTION_KEY, Injection(0.05).as_dict())
    return path


def test_prepared_prompts_in_two_threads_do_not_share_past_kv(device_bundle, bank_path):
    """The past-KV buffers a memory prompt is assembled in belong to the calling thread:
    a prompt prepared in one thread is not overwritten by one prepared in another."""
    rt = Runtime.open(device_bundle, memory=bank_path)
    preps = {}

    def prep(name, prompt):
        preps[name] = rt.prepare(prompt, k=2)

    for name, prompt in (("a", PROMPTS[0]), ("b", PROMPTS[3])):
        t = threading.Thread(target=prep, args=(name, prompt))
        t.start()
        t.join()
    a, b = preps["a"], preps["b"]
    assert a.cache.length > a.pos - 1 and b.cache.length > 0
    assert not any(np.shares_memory(x, y) for x in a.cache.keys for y in b.cache.keys)
    alone = Runtime.open(device_bundle, memory=bank_path)
    want = alone.prepare(PROMPTS[0], k=2)
    for x, y in zip(a.cache.keys + a.cache.values, want.cache.keys + want.cache.values):
        np.testing.assert_array_equal(x, y)


def test_concurrent_generate_with_memory_matches_sequential(device_bundle, bank_path):
    rt = Runtime.open(device_bundle, memory=bank_path)
    want = [_answer(rt, p) for p in PROMPTS]
    assert len({w[1] for w in want}) > 3 and any(len(w[1]) == 2 for w in want)  # varied entries, some k=2
    shared = Runtime.open(device_bundle, memory=bank_path)  # fresh: layouts and index built under load
    jobs = PROMPTS * 3
    with ThreadPoolExecutor(THREADS) as pool:
        got = list(pool.map(lambda p: _answer(shared, p), jobs))
    assert got == want * 3


def test_concurrent_stream_matches_sequential(device_bundle, bank_path):
    rt = Runtime.open(device_bundle, memory=bank_path)

    def stream(p):
        return list(rt.stream(p, k=2, max_new_tokens=6, ignore_eos=True))

    want = [stream(p) for p in PROMPTS]
    with ThreadPoolExecutor(THREADS) as pool:
        assert list(pool.map(stream, PROMPTS * 2)) == want * 2


def _states(device_bundle, bank_path, tmp_path, strategy="full"):
    """The bank before and after learning NEW (same call and seed as the writer), the bank
    between a two-commit learn's commits (old entries minus the evictions), and the answers
    each state gives."""
    before, after, evicted = tmp_path / "before.ikv", tmp_path / "after.ikv", tmp_path / "evicted.ikv"
    for p in (before, after, evicted):
        shutil.copy(bank_path, p)
    from inducekv.learn import learn_task

    rt = Runtime.open(device_bundle)
    res = learn_task(rt, after, NEW, name="flags", n_anchors=2, strategy=strategy)
    assert res.added > 0
    with Bank.open(after) as b:
        kept = {e.entry_id for e in b.entries()}
    with Bank.open(evicted, writable=True) as b, b.transaction() as tx:
        for e in b.entries():
            if e.entry_id not in kept:
                tx.remove(e.slot)
    answers = {}
    for name, path in (("before", before), ("after", after), ("evicted", evicted)):
        srt = Runtime.open(device_bundle, memory=path)
        answers[name] = {p: _answer(srt, p) for p in PROMPTS}
    assert sum(answers["before"][p] != answers["after"][p] for p in PROMPTS) >= 3  # the learn changes answers
    return answers, res


def _serve_while_learning(device_bundle, live, strategy):
    """Readers on one runtime serve PROMPTS over and over while the same runtime learns NEW;
    returns what each reader saw: (round, learned before the round began, prompt, answer)."""
    rt = Runtime.open(device_bundle, memory=live)
    first_round, learned = threading.Semaphore(0), threading.Event()
    errors, seen = [], []

    def serve(offset):
        try:
            rounds = 0
            while True:
                done = learned.is_set()
                for p in PROMPTS[offset:] + PROMPTS[:offset]:
                    seen.append((rounds, done, p, _answer(rt, p)))
                rounds += 1
                if rounds == 1:
                    first_round.release()
                if done:
                    return
        except Exception as e:  # anything a reader raises fails the test
            errors.append(e)
            if rounds == 0:
                first_round.release()

    def learn():
        from inducekv.learn import learn_task

        for _ in range(THREADS - 1):   # every reader has served the before state once
            first_round.acquire()
        try:
            learn_task(rt, live, NEW, name="flags", n_anchors=2, strategy=strategy)   # the same runtime that serves
        except Exception as e:
            errors.append(e)
        learned.set()

    threads = [threading.Thread(target=serve, args=(i * 3,)) for i in range(THREADS - 1)] + [threading.Thread(target=learn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return seen


def test_learning_while_serving_gives_the_before_or_the_after_answer(device_bundle, bank_path, tmp_path):
    answers, res = _states(device_bundle, bank_path, tmp_path)   # "full" on the tiny model: nothing evicted
    assert res.evicted == 0
    live = tmp_path / "live.ikv"
    shutil.copy(bank_path, live)
    for rounds, done, p, got in _serve_while_learning(device_bundle, live, "full"):
        if rounds == 0:
            assert got == answers["before"][p], p        # served before the writer started
        elif done:
            assert got == answers["after"][p], p         # served after its commit
        else:
            assert got in (answers["before"][p], answers["after"][p]), p


def test_a_two_commit_learn_while_serving_gives_before_evicted_or_after(device_bundle, tmp_path):
    """The default strategy in a bank too small for the new entries beside the old: the learn
    evicts in a first commit and adds in a second, and a reader in between is served the old
    entries minus the evictions (``learn/commit.py``), never anything else."""
    from inducekv.learn.select import DEFAULT_STRATEGY
    from inducekv.runtime.memory import INJECTION_KEY, Injection

    small = tmp_path / "small.ikv"
    rt = Runtime.open(device_bundle)
    with Bank.create_for(small, 112 << 10, rt.manifest, scheme="int8", max_tokens=64) as b:
        add_all(rt, b, OLD, "codes")       # 5 of the 6 fit, 8 pages free
        with b.transaction() as tx:
            tx.set_extra(INJECTION_KEY, Injection(0.05).as_dict())
    answers, res = _states(device_bundle, small, tmp_path, DEFAULT_STRATEGY)
    assert res.commits == 2 and res.evicted > 0
    assert any(answers["evicted"][p] not in (answers["before"][p], answers["after"][p]) for p in PROMPTS)
    live = tmp_path / "live.ikv"
    shutil.copy(small, live)
    for rounds, done, p, got in _serve_while_learning(device_bundle, live, DEFAULT_STRATEGY):
        if rounds == 0:
            assert got == answers["before"][p], p
        elif done:
            assert got == answers["after"][p], p
        else:
            assert got in (answers["before"][p], answers["evicted"][p], answers["after"][p]), p
