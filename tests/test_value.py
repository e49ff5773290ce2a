"""Held-out value (learn/value.py) and its facility location in selection (learn/select.py)."""
from __future__ import annotations

import numpy as np

from inducekv.learn import select as sel
from inducekv.learn.candidates import Candidate
from inducekv.learn.value import TWIN, served


def _cand(gain, neighbours=(), gains=()):
    return Candidate("q", "a", b"", 4, np.zeros(4, np.float32), base=-5.0, gain=gain, neighbours=neighbours,
                     neighbour_gains=gains)


def _facts():
    """Fact A stated three times (0, 1, 2: each serves the others), facts B (3) and C (4) once.
    A's statements have the largest gains of all."""
    cands = [_cand(3.0, (1, 2), (2.9, 2.8)), _cand(3.0, (0, 2), (2.9, 2.9)), _cand(3.0, (0, 1), (2.9, 2.9)),
             _cand(2.0, (4, 0), (0.1, -0.5)), _cand(2.0, (3, 0), (0.2, -0.4))]
    return cands


def _pool(cands, served_terms=None):
    n = len(cands)
    rng = np.random.default_rng(0)
    return sel.Pool(nbytes=np.full(n, 1000.0), gain=np.array([c.gain for c in cands]), retention=np.zeros(n),
                    keys=rng.standard_normal((n, 8)), is_new=np.ones(n, bool), age=np.zeros(n), served=served_terms)


def test_served_terms_weight_each_fact_about_once():
    q, s, g, w = served(_facts(), offset=10)
    assert len(q) == 15 and set(q.tolist()) == set(range(10, 15))
    assert np.allclose(w[q == 10], 1 / 3) and np.allclose(w[q == 13], 1.0)   # A has two twins, B none
    assert (g[(q == 13) & (s == 13)] == 2.0).all()                            # the own gain is a term
    lone = _cand(1.0, (0,), (TWIN * 1.0 - 1e-6,))                             # just below a twin
    assert served([lone])[3].tolist() == [1.0, 1.0]


def test_facility_location_keeps_one_statement_per_fact():
    cands = _facts()
    plain = sel.select(_pool(cands), 3000, 3000, "likelihood")
    assert set(plain.tolist()) <= {0, 1, 2, 3, 4} and len({0, 1, 2} & set(plain.tolist())) >= 2  # own gains: A twice+
    fl = sel.select(_pool(cands, served(cands)), 3000, 3000, "likelihood")
    assert len({0, 1, 2} & set(fl.tolist())) == 1 and {3, 4} <= set(fl.tolist())
    # with room for all, the duplicates add nothing worth keeping over nothing: still > 0, so kept
    assert len(sel.select(_pool(cands, served(cands)), 10000, 10000, "likelihood")) >= 3


def test_credit_is_what_each_kept_entry_serves():
    cands = _facts()
    terms = served(cands)
    got = sel.credit(terms, [0, 3])
    assert np.isclose(got[0], (3.0 + 2.9 + 2.9) / 3) and np.isclose(got[3], 2.0 + 0.2)  # and C's question a little
    assert sel.credit(terms, [3, 4]) == {3: 2.0, 4: 2.0}                      # a harmful neighbour serves nothing


def test_old_entries_keep_their_stored_value_beside_the_facility_location():
    cands = _facts()
    n = len(cands) + 1
    pool = sel.Pool(nbytes=np.full(n, 1000.0), gain=np.r_[50.0, [c.gain for c in cands]], retention=np.zeros(n),
                    keys=np.random.default_rng(1).standard_normal((n, 8)), is_new=np.r_[False, np.ones(n - 1, bool)],
                    age=np.r_[1.0, np.zeros(n - 1)], task=np.r_[7, np.zeros(n - 1, np.int64)],
                    served=served(cands, offset=1))
    kept = sel.select(pool, 3000, 3000, "likelihood").tolist()
    assert 0 in kept and len(kept) == 3
