"""Train the default VLM's vision tower + connector on generated images (2 CPU cores).

    python -m inducekv.export.train_vlm --out export/default_vlm/vision.safetensors

The text backbone (SmolLM2-135M-Instruct) stays frozen; only the vision tower, the
connector and the rows of the added special tokens train. Recipe:

1. **tower pre-training** (``--steps1``): the ViT alone, mean-pooled, with linear heads
   for colour / shape / count / digit (cross-entropy). Cheap (0.2 s a step), and gives the
   second stage features that already separate what the questions ask about. It needs its
   2,500 steps: after 800 the shape head was right 58% of the time, after 2,500 97%.
2. **alignment through the frozen LM** (``--steps2``): image + question rendered with the
   backbone's chat template exactly as the runtime renders it, loss = cross-entropy of the
   answer tokens (+ ``<|im_end|>``), gradients flow through the frozen LM into the
   connector and the tower. The system turn is computed once and reused as past KV; half
   the batches use the memory template's system text so answers also work with ``ikv-learn``.
   A share ``--episodes`` of the steps are **in-context episodes** instead
   (``export/episodes.py``): 1-4 image entries laid out as the runtime injects them, a
   query image, and a made-up answer word that only the matching entry gives.
   The tower's rate here is 1e-4 (``--tower-lr 0.33`` of 3e-4; the connector's 1e-3), so it
   keeps what stage 1 taught it to see.

Half the images of stage 1 and of the direct batches are ``varied`` renderings
(``imagedata``: backgrounds, outlines, sizes, resolutions, anti-aliasing), so seeing holds
on images drawn by other code. ``--named-colours S`` also colours a share S of the varied
shapes anywhere in the colour name's range (``imagedata.NAMED_RANGES``; 0 in the shipped
recipe), in both stages or, with ``--named-in``, in one. The defaults are the shipped recipe (one run, seed 0).

Pixels are made by the runtime's own preprocessing (``runtime/images.py``), so training
and inference see the same numbers. Everything is seeded; the data is
``export/imagedata.py`` (shapes and scikit-learn's digits 0-1399; 1400+ are held out).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from inducekv.export import default_vlm as dv
from inducekv.export import imagedata as data


def _coin(rng, p: float) -> bool:
    """True with probability p; draws nothing when p is 0 (so a recipe without it keeps its stream)."""
    return bool(p) and bool(rng.random() < p)


def _pixels(pictures, settings):
    """Images (arrays or ``Sample``s) -> pixel values (N, 3, H, W) by the runtime's preprocessing."""
    import torch

    from inducekv.runtime import images

    return torch.from_numpy(np.concatenate([images.preprocess(getattr(p, "image", p), settings)[0]
                                            for p in pictures]))


class Tower:
    """The trainable part: vision transformer + connector + added-token rows."""

    def __init__(self, cfg, hidden: int, table_mean):
        import torch
        from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector, Idefics3VisionTransformer

        self.vision = Idefics3VisionTransformer(cfg.vision_config)
        self.connector = Idefics3Connector(cfg)
        self.added = torch.nn.Parameter(table_mean.repeat(len(dv.NEW_TOKENS), 1).clone())
        self.cfg = cfg

    def parameters(self):
        return list(self.vision.parameters()) + list(self.connector.parameters()) + [self.added]

    def hidden(self, px):
        import torch

        B = px.shape[0]
        g = self.cfg.vision_config.image_size // self.cfg.vision_config.patch_size
        mask = torch.ones(B, g, g, dtype=torch.bool)
        return self.vision(pixel_values=px, patch_attention_mask=mask).last_hidden_state    # (B, g*g, C)

    def features(self, px):
        return self.connector(self.hidden(px))                                                # (B, n, hidden)

    def load(self, path: Path) -> dict:
        """Weights from a file this script wrote; returns its metadata (recipe, minutes)."""
        import torch
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        pre_v, pre_c = "model.vision_model.", "model.connector."
        self.vision.load_state_dict({k[len(pre_v):]: v for k, v in state.items() if k.startswith(pre_v)})
        self.connector.load_state_dict({k[len(pre_c):]: v for k, v in state.items() if k.startswith(pre_c)})
        with torch.no_grad():
            self.added.copy_(state[dv.ADDED_KEY])
        return meta

    def state_dict(self) -> dict:
        out = {"model.vision_model." + k: v for k, v in self.vision.state_dict().items()}
        out.update({"model.connector." + k: v for k, v in self.connector.state_dict().items()})
        out[dv.ADDED_KEY] = self.added.detach()
        return {k: v.detach().contiguous().float() for k, v in out.items()}


def stage1(tower, settings, steps: int, batch: int, rng, log, varied: float = 0.0):
    """Tower pre-training with attribute heads."""
    import torch

    C = tower.cfg.vision_config.hidden_size
    heads = torch.nn.ModuleDict({"colour": torch.nn.Linear(C, len(data.COLOURS)), "shape": torch.nn.Linear(C, len(data.SHAPES)),
                                 "count": torch.nn.Linear(C, len(data.NUMBERS)), "digit": torch.nn.Linear(C, 10)})
    labels = {"colour": list(data.COLOURS), "shape": list(data.SHAPES), "count": list(data.NUMBERS),
              "digit": [str(i) for i in range(10)]}
    params = list(tower.vision.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for step in range(steps):
        shp = [data.shapes(rng, count=1 if rng.random() < 0.5 else None, varied=_coin(rng, varied))
               for _ in range(batch // 2)]
        dig = [data.digit(rng, "train", varied=_coin(rng, varied)) for _ in range(batch - batch // 2)]
        pooled = tower.hidden(_pixels(shp + dig, settings)).mean(1)                         # (B, C)
        loss = 0.0
        for name in ("colour", "shape", "count"):
            y = torch.tensor([labels[name].index(s.facts[name]) for s in shp])
            loss = loss + torch.nn.functional.cross_entropy(heads[name](pooled[: len(shp)]), y)
        y = torch.tensor([int(s.facts["digit"]) for s in dig])
        loss = loss + torch.nn.functional.cross_entropy(heads["digit"](pooled[len(shp):]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"stage1 step {step} loss {float(loss):.3f} ({time.time() - t0:.0f} s)")


class Renderer:
    """Chat-template token ids for (question, answer), split at the image and the answer."""

    def __init__(self, tok, image_text: str, systems: list[str | None]):
        self.tok = tok
        marker_img, marker_ans = "\x00IMG\x00", "\x00ANS\x00"
        self.prefixes, self.parts = [], []
        for system in systems:
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": marker_img + "QUESTION"}, {"role": "assistant", "content": marker_ans}]
            text = tok.apply_chat_template(msgs, tokenize=False)
            pre, rest = text.split("<|im_start|>user", 1)
            self.prefixes.append(tok.encode(pre, add_special_tokens=False))
            self.parts.append("<|im_start|>user" + rest)
        self.image_text = image_text
        self.end = tok.convert_tokens_to_ids("<|im_end|>")

    def ids(self, which: int, question: str, answer: str) -> tuple[list[int], int]:
        """(ids after the system prefix, index where the answer starts)."""
        text = self.parts[which].replace("\x00IMG\x00", self.image_text).replace("QUESTION", question)
        before = text.split("\x00ANS\x00")[0]
        q = self.tok.encode(before, add_special_tokens=False)
        a = self.tok.encode(answer, add_special_tokens=False) + [self.end]
        return q + a, len(q)


def _embed(tower, emb, ids, feats, image_token_id: int, new_ids_t):
    """Input embeddings: frozen rows, trained rows for the added tokens, image features in place."""
    import torch

    with torch.no_grad():
        x = emb(ids.clamp(max=emb.num_embeddings - 1))
    x = x.clone()
    is_new = torch.isin(ids, new_ids_t)
    if is_new.any():
        rows = (ids[is_new][:, None] == new_ids_t[None]).float().argmax(1)
        x[is_new] = tower.added[rows]
    x[ids == image_token_id] = feats.reshape(-1, feats.shape[-1])
    return x


def _prefix_cache(lm, ids: list[int]):
    import torch

    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids]), use_cache=True)
    kv = out.past_key_values
    return kv.to_legacy_cache() if hasattr(kv, "to_legacy_cache") else kv


def _expand(legacy, batch: int):
    from transformers import DynamicCache

    return DynamicCache.from_legacy_cache(tuple((k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                                                for k, v in legacy))


def _direct_batch(render, which: int, batch: int, rng, pad_id: int, varied: float):
    """Direct questions: (ids (B, S), attention mask (B, P + S), target (B, S), images)."""
    import torch

    fams = rng.choice(data.TRAINED, size=batch)
    items = [_varied(str(f), rng) if _coin(rng, varied) else data.sample(str(f), rng) for f in fams]
    seqs = [render.ids(which, q, a) for _, q, a in items]
    S = max(len(s) for s, _ in seqs)
    P = len(render.prefixes[which])
    ids = torch.full((batch, S), pad_id, dtype=torch.long)
    mask = torch.zeros(batch, P + S, dtype=torch.long)
    mask[:, :P] = 1
    target = torch.full((batch, S), -100, dtype=torch.long)
    for i, (s, a0) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, P: P + len(s)] = 1
        target[i, a0 - 1: len(s) - 1] = torch.tensor(s[a0:])      # logits at t predict token t+1
    return ids, mask, target, [s for s, _, _ in items]


def _varied(family: str, rng):
    """A direct question on a ``varied`` rendering: (sample, prompt, answer)."""
    kind, prompt, fact = data.QUESTIONS[family]
    s = (data.digit(rng, "train", varied=True) if kind == "digit"
         else data.shapes(rng, count=None if family == "count" else 1, varied=True))
    return s, prompt, s.facts[fact]


def stage2(tower, lm, tok, settings, steps: int, batch: int, rng, log, image_token_id: int, new_ids: list[int],
           episodes_share: float = 0.0, episode_batch: int = 8, varied: float = 0.0, lr: float = 1.0,
           tower_lr: float = 1.0):
    import torch

    from inducekv.export import episodes
    from inducekv.runtime.memory import TEMPLATES
    from inducekv.runtime import images

    image_text = images.preprocess(np.zeros((8, 8, 3), np.uint8), settings)[2]
    facts = TEMPLATES["facts"]
    render = Renderer(tok, image_text, [None, facts.system])
    layout = episodes.Layout(tok, image_text, facts.system, facts.entry)
    emb = lm.model.embed_tokens
    prefix_kv = [_prefix_cache(lm, p) for p in render.prefixes]
    episode_kv = _prefix_cache(lm, layout.prefix_ids)
    P0 = len(layout.prefix_ids)
    pad_id = tok.pad_token_id or 0
    new_ids_t = torch.tensor(new_ids)
    rates = [3e-4 * lr * tower_lr, 1e-3 * lr]          # tower, connector + added rows
    groups = [{"params": list(tower.vision.parameters()), "lr": rates[0]},
              {"params": list(tower.connector.parameters()) + [tower.added], "lr": rates[1]}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=rates, total_steps=steps, pct_start=0.05)
    t0 = time.time()
    run = {"direct": [None, None], "episode": [None, None]}    # running loss, token accuracy
    for step in range(steps):
        if _coin(rng, episodes_share):
            kind = "episode"
            eps = [episodes.episode(rng) for _ in range(episode_batch)]
            ids, mask, target, pics = episodes.batch(layout, eps, pad_id)
            B, S = ids.shape
            cache = _expand(episode_kv, B)
            pos = torch.arange(P0, P0 + S)[None].expand(B, -1)
        else:
            kind = "direct"
            which = int(rng.random() < 0.5)
            ids, mask, target, pics = _direct_batch(render, which, batch, rng, pad_id, varied)
            cache, pos = _expand(prefix_kv[which], ids.shape[0]), None
        x = _embed(tower, emb, ids, tower.features(_pixels(pics, settings)), image_token_id, new_ids_t)
        h = lm.model(inputs_embeds=x, attention_mask=mask, position_ids=pos, past_key_values=cache,
                     use_cache=True).last_hidden_state
        sel = target != -100
        logits = lm.lm_head(h[sel])                                                      # (n_answer_tokens, V)
        loss = torch.nn.functional.cross_entropy(logits, target[sel])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        acc = float((logits.argmax(-1) == target[sel]).float().mean())
        r = run[kind]
        r[0] = float(loss) if r[0] is None else 0.95 * r[0] + 0.05 * float(loss)
        r[1] = acc if r[1] is None else 0.95 * r[1] + 0.05 * acc
        if step % 25 == 0 or step == steps - 1:
            parts = [f"{k} loss {v[0]:.3f} token-acc {v[1]:.3f}" for k, v in run.items() if v[0] is not None]
            log(f"stage2 step {step} " + "; ".join(parts) + f" ({time.time() - t0:.0f} s)")


def main(argv=None):
    import torch
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=dv.WEIGHTS)
    ap.add_argument("--init", type=Path, default=None,
                    help="start from these weights (a file this script wrote) instead of a fresh tower")
    ap.add_argument("--steps1", type=int, default=2500, help="tower pre-training steps (batch --batch1)")
    ap.add_argument("--batch1", type=int, default=64)
    ap.add_argument("--steps2", type=int, default=900, help="alignment steps through the frozen LM")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--episodes", type=float, default=0.35, help="share of stage-2 steps that are in-context episodes")
    ap.add_argument("--named-colours", type=float, default=0.0,
                    help="share of varied shapes coloured anywhere in their colour name's range (imagedata.NAMED_RANGES)")
    ap.add_argument("--named-in", choices=("both", "stage1", "stage2"), default="both",
                    help="the stages whose varied shapes --named-colours applies to")
    ap.add_argument("--varied", type=float, default=0.5, help="share of images drawn as varied renderings (stage 1, and stage 2's direct batches)")
    ap.add_argument("--lr", type=float, default=1.0, help="stage-2 learning rates, as a factor of 3e-4 / 1e-3")
    ap.add_argument("--tower-lr", type=float, default=0.33,
                    help="stage-2 learning rate of the tower alone, as a further factor (below 1 keeps more of what "
                         "stage 1 taught it to see)")
    ap.add_argument("--episode-batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    t0 = time.time()
    lm, tok = dv.load_text_model()
    for p in lm.parameters():
        p.requires_grad_(False)
    new_ids = [tok.convert_tokens_to_ids(t) for t in dv.NEW_TOKENS]
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = dv.config(lm.config, len(tok), image_id)
    from inducekv.export import hfimages

    settings = hfimages.settings_from_hf(dv.processor(tok))
    tower = Tower(cfg, lm.config.hidden_size, lm.model.embed_tokens.weight.detach().mean(0, keepdim=True))
    before, earlier = 0.0, {}
    if args.init:
        earlier = tower.load(args.init)
        before = float(earlier.get("train_minutes", 0.0))
        log(f"started from {args.init} ({before:.1f} min of training, recipe {earlier.get('recipe')})")
    log(f"loaded backbone in {time.time() - t0:.0f} s; tower {sum(p.numel() for p in tower.parameters()):,} params")
    data.NAMED_SHARE = args.named_colours if args.named_in in ("both", "stage1") else 0.0
    if args.steps1:
        stage1(tower, settings, args.steps1, args.batch1, rng, log, varied=args.varied)
    t1 = time.time()
    data.NAMED_SHARE = args.named_colours if args.named_in in ("both", "stage2") else 0.0
    stage2(tower, lm, tok, settings, args.steps2, args.batch, rng, log, image_id, new_ids,
           episodes_share=args.episodes, episode_batch=args.episode_batch, varied=args.varied, lr=args.lr,
           tower_lr=args.tower_lr)
    total = time.time() - t0
    log(f"trained in {total / 60:.1f} min (stage 2 {(time.time() - t1) / 60:.1f} min)"
        + (f"; {before + total / 60:.1f} min with the run it started from" if args.init else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    recipe = json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    meta = {"recipe": recipe, "vision": json.dumps(dv.VISION), "train_minutes": f"{before + total / 60:.1f}"}
    if args.init:   # the recipe becomes the list of runs, earliest first
        runs = json.loads(earlier.get("recipe") or "[]")
        meta["recipe"] = json.dumps((runs if isinstance(runs, list) else [runs]) + [json.loads(recipe)])
    earlier_log = args.init.with_suffix(".log").read_text() if args.init and args.init.with_suffix(".log").is_file() else ""
    save_file(tower.state_dict(), str(args.out), metadata=meta)
    (args.out.with_suffix(".log")).write_text(earlier_log + "\n".join(log_lines) + "\n")
    log(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
