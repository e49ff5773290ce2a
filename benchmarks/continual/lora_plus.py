"""Two more LoRA baselines at matched bytes (workstation side: torch + peft): replay and experts.

Both train like ``lora.SequentialLoRA`` (same modules, recipe, epochs, prompts) and count
every byte they keep against the same cap as the bank:

- ``ReplayLoRA`` ("replay"): one adapter trained on each new task *together with* a replay
  buffer of earlier examples (experience replay). The buffer keeps raw examples (prompt,
  answer, image file bytes, 16 bytes of record each, as prompt retrieval counts them). The
  adapter takes the largest rank whose fp16 weights leave at least ``BUFFER_MIN`` of the cap,
  and the buffer takes what is left (thousands of text examples, ~100 images at 4 MiB). A task trains on its own examples plus as many buffer examples (a seeded sample)
  as it has; then its examples enter the buffer, which evicts uniformly at random when full.
- ``ExpertLoRA`` ("experts", a mixture of per-task experts): one LoRA expert per task and a
  router that picks the expert by the **same frozen retrieval key** the bank uses (nearest
  task centroid of the training prompts' keys, cosine; fp16 centroids count against the
  cap). The footprint stays fixed: with t tasks the experts share the rank budget R (cap
  minus the router, in units of one rank's bytes): experts above R // t are cut to it by an
  SVD of their weight update (the best rank-r approximation of B @ A), and the new expert
  takes the ranks left (at least R // t). When
  R < t there is no room for another expert: the task joins the expert whose centroid is
  nearest and trains it further.

Time to first token: a merged adapter costs nothing, so replay reports the zero-shot
model's TTFT. Experts cannot stay merged (the expert changes per query), so their TTFT is
the zero-shot one plus the measured key pass that routes the query; the unmerged adapter's
extra matmuls per token are not counted (a lower bound).

``BUFFER_MIN`` was fixed before any run, not tuned.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np

from lora import ALPHA, TARGETS, SequentialLoRA, base_model, bytes_per_rank

BUFFER_MIN = 0.05     # of the cap, at least, left to replay's raw examples
RECORD = 16           # bytes of bookkeeping per stored example (as methods.PromptRetrieval counts)


def expert_ranks(ranks: list[int], budget: int) -> list[int] | None:
    """Ranks after one more expert joins experts of ``ranks`` within ``budget`` ranks in all:
    the old ones cut to at most budget // t (t experts after), the new one takes the rest.
    None when budget < t: no room for another expert."""
    t = len(ranks) + 1
    if budget < t:
        return None
    cut = [min(r, budget // t) for r in ranks]
    return cut + [budget - sum(cut)]


def keep_under(items: list, cap: int, nbytes, rng) -> None:
    """Evict uniformly at random until ``items`` fit ``cap`` bytes (in place)."""
    while items and sum(nbytes(i) for i in items) > cap:
        items.pop(int(rng.integers(len(items))))


def example_bytes(ex) -> int:
    """Bytes a raw example costs in a store: prompt, answer, image file, record."""
    img = Path(ex.image).stat().st_size if getattr(ex, "image", None) is not None else 0
    return len(ex.prompt.encode()) + len(ex.answers[0].encode()) + img + RECORD


class ReplayLoRA(SequentialLoRA):
    name = "replay"

    def __init__(self, rt, cap: int, ttft, seed: int = 0, epochs: int | None = None):
        per_rank = bytes_per_rank(base_model(rt))
        super().__init__(rt, int(cap * (1 - BUFFER_MIN)) // per_rank * per_rank, ttft, seed, epochs)
        self.buffer_cap = cap - self.adapter_bytes
        self.buffer: list = []

    def learn(self, task, examples, candidates):
        t0 = time.perf_counter()
        n = min(len(self.buffer), len(examples))
        replay = [self.buffer[i] for i in self.rng.choice(len(self.buffer), n, replace=False)] if n else []
        self._train(self._rows(list(examples) + replay))
        for ex in examples:
            self.buffer.append(ex)
            keep_under(self.buffer, self.buffer_cap, example_bytes, self.rng)
        self.train_s += time.perf_counter() - t0

    def entries(self) -> dict:
        return {"rank": self.rank, "adapter_bytes": self.adapter_bytes, "buffer": len(self.buffer),
                "buffer_bytes": sum(example_bytes(e) for e in self.buffer)}


class ExpertLoRA(SequentialLoRA):
    name = "experts"

    def __init__(self, rt, cap: int, ttft, seed: int = 0, epochs: int | None = None):
        from inducekv.runtime.session import KeyEncoder

        self._setup(rt, self._ttft, seed, epochs)
        self.cap, self.seed, self.zero_ttft = cap, seed, ttft
        self.base = base_model(rt)
        self.per_rank = bytes_per_rank(self.base)
        self.keys = KeyEncoder(rt.bundle_dir, rt.manifest, rt.profile)
        self.model = None
        self.centroids: list[np.ndarray] = []   # per task (K,) fp16, unit length
        self.route: list[str] = []              # per task: its expert's adapter name
        self.ranks: dict[str, int] = {}         # adapter name -> rank
        self.key_ms: dict = {}                  # question -> key pass time (routing)

    @property
    def router_bytes(self) -> int:
        return sum(c.nbytes + 4 for c in self.centroids)

    @property
    def adapter_bytes(self) -> int:
        return sum(self.ranks.values()) * self.per_rank

    def _key(self, ex) -> np.ndarray:
        from inducekv.runtime.memory import image_of, key_of

        t = time.perf_counter()
        q = key_of(self.rt, self.keys, ex.prompt, image_of(self.rt, ex))
        self.key_ms[(ex.prompt, getattr(ex, "image", None))] = (time.perf_counter() - t) * 1e3
        return q / (np.linalg.norm(q) + 1e-12)

    def _config(self, rank: int):
        from peft import LoraConfig

        return LoraConfig(r=rank, lora_alpha=ALPHA, use_rslora=True, lora_dropout=0.0,
                          target_modules=list(TARGETS), bias="none")

    def learn(self, task, examples, candidates):
        import torch

        t0 = time.perf_counter()
        centroid = np.mean([self._key(ex) for ex in examples], axis=0)
        self.centroids.append((centroid / (np.linalg.norm(centroid) + 1e-12)).astype(np.float16))
        t = len(self.centroids)
        budget = (self.cap - self.router_bytes) // self.per_rank       # ranks all experts may hold
        plan = expert_ranks(list(self.ranks.values()), budget)
        if plan is not None:                                           # room for a new expert
            for (name, r), r_new in zip(list(self.ranks.items()), plan):
                if r_new < r:
                    self._truncate(name, r_new)
            rank, name = plan[-1], f"task{t - 1}"
            if self.model is None:
                from peft import get_peft_model

                torch.manual_seed(self.seed)
                self.model = get_peft_model(copy.deepcopy(self.base), self._config(rank), adapter_name=name)
            else:
                self.model.add_adapter(name, self._config(rank))
            self.ranks[name] = rank
        elif self.model is None:
            raise SystemExit(f"a {self.cap}-byte cap is smaller than a rank-1 LoRA expert ({self.per_rank} bytes)")
        else:                                                          # full: share the nearest expert
            near = int(np.argmax([float(c.astype(np.float32) @ centroid) for c in self.centroids[:-1]]))
            name = self.route[near]
        self.route.append(name)
        if self.adapter_bytes + self.router_bytes > self.cap:
            raise AssertionError(f"experts {self.adapter_bytes} + router {self.router_bytes} bytes > cap {self.cap}")
        self.model.set_adapter(name)                                   # only this expert trains
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._train(self._rows(examples), params)
        self.train_s += time.perf_counter() - t0

    def _truncate(self, name: str, rank: int) -> None:
        """Replace expert ``name`` by its best rank-``rank`` approximation (per module, SVD of the update)."""
        import torch
        from peft.tuners.lora import LoraLayer

        tmp = f"{name}_r{rank}"
        self.model.add_adapter(tmp, self._config(rank))
        with torch.no_grad():
            for mod in self.model.modules():
                if not isinstance(mod, LoraLayer) or name not in mod.lora_A:
                    continue
                A, B = mod.lora_A[name].weight, mod.lora_B[name].weight          # (r, in), (out, r)
                u, s, vh = torch.linalg.svd(mod.scaling[name] * (B @ A), full_matrices=False)
                root = torch.sqrt(s[:rank] / mod.scaling[tmp])                  # split S evenly over B and A
                mod.lora_B[tmp].weight.copy_(u[:, :rank] * root)                # (out, rank)
                mod.lora_A[tmp].weight.copy_(root[:, None] * vh[:rank])         # (rank, in)
        self.model.delete_adapter(name)
        self._rename(tmp, name, rank)

    def _rename(self, tmp: str, name: str, rank: int) -> None:
        """Keep the expert's name: copy ``tmp`` back under it (peft has no rename)."""
        import torch
        from peft.tuners.lora import LoraLayer

        self.model.add_adapter(name, self._config(rank))
        with torch.no_grad():
            for mod in self.model.modules():
                if isinstance(mod, LoraLayer) and tmp in mod.lora_A:
                    mod.lora_A[name].weight.copy_(mod.lora_A[tmp].weight)
                    mod.lora_B[name].weight.copy_(mod.lora_B[tmp].weight)
        self.model.delete_adapter(tmp)
        self.ranks[name] = rank

    def answer_all(self, examples) -> list[str]:
        """Each question routed to its expert by its key; one batch per expert."""
        cents = np.stack(self.centroids).astype(np.float32)
        experts = [self.route[int(np.argmax(cents @ self._key(ex)))] for ex in examples]
        texts = [""] * len(examples)
        for name in sorted(set(experts)):
            idx = [i for i, e in enumerate(experts) if e == name]
            self.model.set_adapter(name)
            for i, text in zip(idx, self._generate([examples[i] for i in idx])):
                texts[i] = text
        return texts

    def _ttft(self, ex) -> float:
        return self.zero_ttft(ex) + self.key_ms.get((ex.prompt, getattr(ex, "image", None)), 0.0)

    def entries(self) -> dict:
        return {"experts": dict(self.ranks), "adapter_bytes": self.adapter_bytes, "router_bytes": self.router_bytes}

