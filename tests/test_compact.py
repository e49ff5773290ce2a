"""ikv-learn --compact genv on the torch-free tiny bundle: kept slots, answer span, catalog, errors."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from inducekv.core.errors import InduceKVError
from inducekv.kernels import kvquant
from inducekv.kernels.positions import rerotate, rerotate_tokens
from inducekv.learn import plan, read_examples, write
from inducekv.learn.candidates import encode_candidates, fit_key_scales
from inducekv.learn.cli import cli
from inducekv.learn.compact import Compaction, Compactor, answer_span, compact_kv, select
from inducekv.memory.bank import Bank
from inducekv.runtime.memory import TEMPLATES, Layout
from inducekv.runtime.session import KVCache, KeyEncoder

FACTS = [("Capital of Vexland?", "Morrow"), ("Colour of a zibble?", "teal"), ("Who built the Orrery?", "Ada Quill"),
         ("Home planet of Zed?", "Kepler Nine")]


def _task(path, n=6):
    path.write_text("".join(json.dumps({"prompt": f"Capital of Vex{i}land?", "answer": f"Morrow{i}"}) + "\n"
                            for i in range(n)))
    return path


def _bank(rt, path, scheme="k4v4", cap=400_000):
    return Bank.create_for(path, cap, rt.manifest, scheme=scheme, force=True, max_tokens=96)


def test_rerotate_tokens_is_per_token_rerotate(rng):
    k = rng.standard_normal((2, 2, 5, 16)).astype(np.float32)
    d = np.array([0, -3, 2, 7, -1])
    got = rerotate_tokens(k, d, 50000.0)
    for t in range(5):
        np.testing.assert_allclose(got[:, :, t], rerotate(k[:, :, t:t + 1], int(d[t]), 50000.0)[:, :, 0], atol=1e-6)
    np.testing.assert_array_equal(rerotate_tokens(k, np.zeros(5), 50000.0), k)


@pytest.mark.parametrize("prompt,answer", FACTS)
def test_answer_span_is_the_answer_and_always_kept(rt, layout, prompt, answer):
    ids = layout.entry_ids(prompt, answer)
    a0, a1 = answer_span(rt, layout, prompt, answer)
    assert rt.tokenizer.decode(ids[a0:a1]).strip() == answer
    k, v = layout.encode_entry(prompt, answer)
    for slots in (1, 3, 10, 20):
        c = Compactor(rt, layout, Compaction("genv", slots))
        _, _, keep = c(prompt, answer, k, v)
        assert set(range(a0, a1)) <= set(keep.tolist())
        assert len(keep) == max(slots, a1 - a0) and list(keep) == sorted(set(keep.tolist()))


def test_select_fills_the_budget_by_importance():
    imp = np.array([5.0, 0.1, 9.0, 3.0, 0.0, 7.0])
    assert select(imp, (3, 5), 4).tolist() == [2, 3, 4, 5]   # span 3..4, then 2 and 5 (the largest others)
    assert select(imp, (0, 0), 2).tolist() == [2, 5]
    assert select(imp, (1, 5), 2).tolist() == [1, 2, 3, 4]   # a span longer than the budget stays whole


@pytest.mark.parametrize("scheme", ["k4v4", "k8v8", "fp16"])
def test_compaction_keeps_the_chosen_slots_bit_exact(rt, layout, scheme):
    """The stored payload is the full entry's K/V at the kept tokens, keys re-rotated to
    consecutive positions: byte-equal to packing exactly that, values equal to the full entry's
    stored values at those tokens, keys equal to the full entry's after rotating back."""
    prompt, answer = FACTS[2]
    ks = fit_key_scales(rt, layout, [{"prompt": p, "answer": a} for p, a in FACTS], scheme, any_position=True) \
        if scheme in kvquant.SHARED_KEY_SCALE else None
    k, v = layout.encode_entry(prompt, answer)
    ck, cv, keep = Compactor(rt, layout, Compaction("genv", 14))(prompt, answer, k, v)
    assert len(keep) == 14 and keep[-1] < k.shape[2]
    theta = float(rt.manifest.rope["theta"])
    payload = kvquant.pack(ck, cv, scheme, ks)
    ref = kvquant.pack(rerotate_tokens(k[:, :, keep], np.arange(14) - keep, theta), v[:, :, keep], scheme, ks)
    assert payload == ref
    m = rt.manifest
    dims = (m.num_layers, m.num_kv_heads)
    fk, fv = kvquant.unpack(kvquant.pack(k, v, scheme, ks), scheme, *dims, k.shape[2], m.head_dim, ks)
    gk, gv = kvquant.unpack(payload, scheme, *dims, 14, m.head_dim, ks)
    np.testing.assert_array_equal(gv, fv[:, :, keep])                   # values: bit-exact
    np.testing.assert_array_equal(cv, v[:, :, keep])
    back = rerotate_tokens(ck, keep - np.arange(14), theta)               # keys at their original positions
    np.testing.assert_allclose(back, k[:, :, keep], atol=1e-4 * np.abs(k).max())
    same = keep == np.arange(14)                                          # slots that did not move
    np.testing.assert_array_equal(gk[:, :, same], fk[:, :, keep[same]])


def test_compact_entry_attends_like_the_full_entry_masked(rt, layout):
    """The compact entry, rotated back to its tokens' original positions, gives the same logits
    as the full entry with every other token masked out."""
    prompt, answer = FACTS[0]
    k, v = layout.encode_entry(prompt, answer)
    ck, cv, keep = Compactor(rt, layout, Compaction("genv", 6))(prompt, answer, k, v)
    T, P0 = k.shape[2], layout.p0
    theta = float(rt.manifest.rope["theta"])
    q = layout.query_ids(prompt)
    pos = np.arange(P0 + T, P0 + T + len(q))
    pre = layout.prefix_cache
    full = KVCache([np.concatenate([pre.keys[i], k[i][None]], 2) for i in range(len(k))],
                   [np.concatenate([pre.values[i], v[i][None]], 2) for i in range(len(k))])
    mask = np.ones(P0 + T + len(q), np.int64)
    mask[P0 + np.setdiff1d(np.arange(T), keep)] = 0
    want, _ = rt.decoder.forward(q, full, positions=pos, mask=mask)
    back = rerotate_tokens(ck, keep - np.arange(len(keep)), theta)
    comp = KVCache([np.concatenate([pre.keys[i], back[i][None]], 2) for i in range(len(k))],
                   [np.concatenate([pre.values[i], cv[i][None]], 2) for i in range(len(k))])
    got, _ = rt.decoder.forward(q, comp, positions=pos)
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_genv_bank_records_its_compaction_and_none_is_unchanged(rt, tmp_path):
    ex = read_examples(_task(tmp_path / "t.jsonl"))
    with _bank(rt, tmp_path / "g.ikv") as b:
        p = plan(rt, b, ex, "t", strategy="all", reserve=0.0, n_anchors=0, compact="genv", slots=10)
        assert {p.candidates[i].tokens for i in p.add} == {10}
        write(b, p)
        assert b.catalog["extra"]["compact"] == {"method": "genv", "slots": 10}
        p2 = plan(rt, b, ex[:2], "u", strategy="all", reserve=0.0, n_anchors=0)  # the bank's method by default
        assert p2.compaction == Compaction("genv", 10) and {c.tokens for c in p2.candidates} == {10}
        with pytest.raises(InduceKVError, match="one bank holds one compaction"):
            plan(rt, b, ex, "u", compact="none")
        with pytest.raises(InduceKVError, match="one bank holds one compaction"):
            plan(rt, b, ex, "u", compact="genv", slots=6)
    with _bank(rt, tmp_path / "n.ikv") as b:                     # --compact none: today's full entries
        p = plan(rt, b, ex, "t", strategy="all", reserve=0.0, n_anchors=0, compact="none")
        layout = Layout(rt, TEMPLATES["facts"], "rerotate")
        ks = fit_key_scales(rt, layout, ex, "k4v4")
        ref = encode_candidates(rt, b.geo, layout, KeyEncoder(rt.bundle_dir, rt.manifest, rt.profile), ex,
                                key_scale=ks)
        assert [c.payload for c in p.candidates] == [c.payload for c in ref]
        assert np.array_equal(p.key_scales, ks)
        write(b, p)
        assert "compact" not in b.catalog["extra"]
        with pytest.raises(InduceKVError, match="one bank holds one compaction"):
            plan(rt, b, ex, "u", compact="genv")


def test_cli_compact_and_bad_combinations(device_bundle, tmp_path):
    from tinybundle import build

    r = CliRunner()
    task = _task(tmp_path / "t.jsonl")
    base = ["--bundle", str(device_bundle), "--task", str(task), "--json", "--quiet"]
    bank = tmp_path / "g.ikv"
    out = r.invoke(cli, base + ["--memory", str(bank), "--budget", "400KB", "--scheme", "k4v4", "--compact", "genv",
                                "--slots", "12"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["compact"] == {"method": "genv", "slots": 12}

    def fails(args, match):
        res = r.invoke(cli, args)
        assert res.exit_code == 2, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:") and match in lines[0], res.output

    fails(base + ["--memory", str(bank), "--compact", "none"], "one bank holds one compaction")
    fails(base + ["--memory", str(tmp_path / "x.ikv"), "--budget", "400KB", "--slots", "4"], "--compact genv")
    old = build(tmp_path / "old", probe=False)  # a bundle exported before the probe graph
    fails(["--bundle", str(old), "--task", str(task), "--memory", str(tmp_path / "y.ikv"), "--budget", "400KB",
           "--compact", "genv"], "re-export")
    assert not (tmp_path / "x.ikv").exists()
    res = r.invoke(cli, base + ["--memory", str(tmp_path / "z.ikv"), "--budget", "400KB", "--slots", "0",
                                "--compact", "genv"])
    assert res.exit_code == 2
