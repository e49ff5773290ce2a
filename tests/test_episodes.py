"""In-context training episodes of the default VLM (``export/episodes.py``).

The batch layout must equal what the runtime does: each entry encoded on its own after the
shared prefix, then the query reading them as past KV (checked on a tiny random Llama), and
no episode may answer with a word of an evaluation task.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from inducekv.export import episodes, imagedata  # noqa: E402

IMG = "<image>"


class CharTok:
    """A character-level stand-in for the chat tokenizer (ids 2..: characters; 1: <image>; 0: end)."""

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True):
        text = "".join(f"[{m['role']}]{m['content']}[end]" for m in msgs)
        return text + ("[assistant]" if add_generation_prompt else "")

    def encode(self, text, add_special_tokens=False):
        out, i = [], 0
        while i < len(text):
            if text.startswith(IMG, i):
                out.append(1)
                i += len(IMG)
            else:
                out.append(2 + ord(text[i]) % 120)
                i += 1
        return out

    def convert_tokens_to_ids(self, token):
        return 0


def test_answers_are_never_evaluation_words():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        ep = episodes.episode(rng)
        words = {a for _, _, a in ep.entries} | {ep.query[2]}
        assert not words & imagedata.EVAL_WORDS
        assert ep.query[2] in {a for _, _, a in ep.entries}      # some entry gives the answer
        assert "Vexish" not in ep.query[1]
        seen |= words
    assert len(seen) > 300                                       # fresh words, not a fixed list


def test_batch_equals_entries_encoded_alone_then_injected():
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    lm = LlamaForCausalLM(cfg).eval()
    layout = episodes.Layout(CharTok(), IMG * 3, "Use the facts.\n", "Fact: {prompt} The answer is {answer}.\n")
    rng = np.random.default_rng(1)
    eps = [episodes.episode(rng) for _ in range(6)]
    eps[0].log_alpha = np.log(np.full(len(eps[0].entries), 1.0 / len(eps[0].entries), np.float32))
    ids, mask, target, images = episodes.batch(layout, eps, pad_id=0)
    assert int((ids == 1).sum()) == 3 * len(images) == 3 * sum(len(e.entries) + 1 for e in eps)
    P0 = len(layout.prefix_ids)
    with torch.no_grad():
        pre = lm.model(input_ids=torch.tensor([layout.prefix_ids]), use_cache=True).past_key_values.to_legacy_cache()
        B, S = ids.shape
        cache = DynamicCache.from_legacy_cache(tuple((k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in pre))
        joint = lm(input_ids=ids, attention_mask=mask, position_ids=torch.arange(P0, P0 + S)[None].expand(B, -1),
                   past_key_values=cache, use_cache=True).logits
        for b, ep in enumerate(eps):
            ents, q, a = layout.ids(ep)
            ks, vs, at = [[k] for k, _ in pre], [[v] for _, v in pre], 0
            for e in ents:                                       # each entry alone, after the prefix
                out = lm.model(input_ids=torch.tensor([e]), position_ids=torch.arange(P0 + at, P0 + at + len(e))[None],
                               past_key_values=DynamicCache.from_legacy_cache(pre), use_cache=True)
                for i, (k, v) in enumerate(out.past_key_values.to_legacy_cache()):
                    ks[i].append(k[:, :, P0:])
                    vs[i].append(v[:, :, P0:])
                at += len(e)
            if ep.log_alpha is not None:                         # the runtime's weighting: log alpha on entry slots
                bias = torch.zeros(1, 1, len(q + a), P0 + at + len(q + a))
                o = 0
                for j, e in enumerate(ents):
                    bias[..., P0 + o:P0 + o + len(e)] = float(ep.log_alpha[j])
                    o += len(e)
                bias[..., P0 + at:] = torch.triu(torch.full((len(q + a),) * 2, torch.finfo(torch.float32).min), 1)
            else:
                bias = None
            past = DynamicCache.from_legacy_cache(tuple((torch.cat(k, 2), torch.cat(v, 2)) for k, v in zip(ks, vs)))
            ref = lm(input_ids=torch.tensor([q + a]), attention_mask=bias,
                     position_ids=torch.arange(P0 + at, P0 + at + len(q + a))[None], past_key_values=past).logits
            np.testing.assert_allclose(joint[b, at:at + len(q + a)].numpy(), ref[0].numpy(), atol=1e-4)
            sel = target[b] != -100
            assert target[b][sel].tolist() == a                  # the loss is on the answer + end only


def test_varied_colours_stay_inside_their_names_range():
    """Varied renderings draw a colour anywhere in its name's range; the ranges must not
    overlap (a label would then be wrong) and must hold the palette's own colour."""
    import colorsys

    def hue(rgb):
        h, s, v = colorsys.rgb_to_hsv(*[c / 255 for c in rgb])
        return h * 360, s, v

    def inside(h, name):
        lo, hi = imagedata.NAMED_RANGES[name][0]
        return lo <= h <= hi or lo <= h - 360 <= hi

    rng = np.random.default_rng(0)
    for name, ((h0, h1), (s0, s1), (v0, v1)) in imagedata.NAMED_RANGES.items():
        for rgb in [imagedata.COLOURS[name]] + [imagedata._named_fill(name, rng) for _ in range(50)]:
            h, s, v = hue(rgb)
            h = h - 360 if h > h1 + 1 else h
            assert h0 - 1 <= h <= h1 + 1 and s0 - 0.02 <= s <= s1 + 0.02 and v0 - 0.02 <= v <= v1 + 0.02, (name, rgb)
            assert not any(inside(h % 360, other) for other in imagedata.NAMED_RANGES if other != name), (name, rgb)
    s = imagedata.shapes(np.random.default_rng(1), varied=True)
    assert s.image.dtype == np.uint8 and s.facts["colour"] in imagedata.COLOURS
