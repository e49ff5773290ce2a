"""The Python API an embedded app calls.

    rt = Runtime.open("bundle/", device="cpu")
    r = rt.generate("What is the capital of France?", max_new_tokens=32)
    r.text, r.entries, r.timings
    for piece in rt.stream("Tell me a story"): ...
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from inducekv.devices.profile import DeviceProfile, load_profile
from inducekv.export import contract
from inducekv.export.bundle import Manifest, read_manifest
from inducekv.runtime.errors import InduceKVError, PromptError
from inducekv.runtime.sampling import SamplingConfig, choose
from inducekv.runtime.session import Decoder, KVCache
from inducekv.runtime.tokenizer import ChatTokenizer
from inducekv.runtime.vision import with_image

log = logging.getLogger(__name__)


@dataclass
class Timings:
    tokenize_ms: float = 0.0       # render the chat template + encode
    image_ms: float = 0.0          # image preprocessing + vision graph (image prompts only)
    key_ms: float = 0.0            # retrieval-key pass + calibration (memory only)
    retrieval_ms: float = 0.0      # index search (memory only)
    dequant_ms: float = 0.0        # read + checksum + dequantize entries (memory only)
    prefill_ms: float = 0.0        # the prompt through the decoder
    ttft_ms: float = 0.0           # call start to first token chosen
    decode_ms: float = 0.0         # all tokens after the first
    prompt_tokens: int = 0
    new_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens after the first, per second of decode."""
        return (self.new_tokens - 1) / (self.decode_ms / 1e3) if self.new_tokens > 1 and self.decode_ms > 0 else 0.0

    def as_dict(self) -> dict:
        return {"tokenize_ms": self.tokenize_ms, "image_ms": self.image_ms, "key_ms": self.key_ms, "retrieval_ms": self.retrieval_ms,
                "dequant_ms": self.dequant_ms, "prefill_ms": self.prefill_ms, "ttft_ms": self.ttft_ms,
                "decode_ms": self.decode_ms, "prompt_tokens": self.prompt_tokens,
                "new_tokens": self.new_tokens, "tokens_per_s": self.tokens_per_s}


@dataclass
class Result:
    text: str
    token_ids: list[int]
    stop_reason: str                      # "eos" | "stop" | "length"
    entries: list[dict] = field(default_factory=list)  # retrieved memory entries (id, task, score)
    timings: Timings = field(default_factory=Timings)


class Runtime:
    """A frozen decoder from a bundle, ready to generate (torch-free)."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, profile: DeviceProfile):
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.profile = profile
        st = manifest.special_tokens
        self.tokenizer = ChatTokenizer(bundle_dir / contract.TOKENIZER_FILE, manifest.chat_template,
                                       st.get("bos_token_id"), manifest.add_bos_token)
        self.decoder = Decoder(bundle_dir, manifest, profile)
        self.eos_ids = set(int(i) for i in st.get("eos_token_ids", []))
        self.memory = None  # runtime.memory.Memory when opened with a bank
        self._vision = None

    def encode_image(self, image):
        """An image (path, PIL image or uint8 array) as ``vision.ImageInput``: its features and
        the placeholder text that stands for it in a prompt. Text-only bundles refuse it."""
        if self._vision is None:
            from inducekv.runtime.vision import Vision

            self._vision = Vision(self.bundle_dir, self.manifest, self.profile)
        return self._vision.encode(image)

    @classmethod
    def open(cls, bundle: str | Path, memory: str | Path | None = None, device: str | DeviceProfile = "cpu",
             verify: bool = False) -> "Runtime":
        """Open a bundle, and a memory bank (.ikv) to retrieve from; ``verify`` re-hashes
        every bundle file against the manifest."""
        profile = device if isinstance(device, DeviceProfile) else load_profile(device)
        bundle_dir = Path(bundle)
        rt = cls(bundle_dir, read_manifest(bundle_dir, verify_hashes=verify), profile)
        if memory is not None:
            from inducekv.memory.bank import Bank
            from inducekv.runtime.memory import Memory

            rt.memory = Memory(rt, Bank.open(memory, fingerprint=rt.manifest.fingerprint))
        return rt

    # -- prompt ---------------------------------------------------------------
    def encode_prompt(self, prompt: str, system: str | None = None, chat: bool = True, image=None) -> list[int]:
        """Token ids of a prompt; ``image`` (an ``ImageInput``) goes where the prompt has the
        image token (e.g. ``<image>``), else before the prompt text."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("the prompt is empty; pass some text")
        prompt = with_image(prompt, image, self.manifest)
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            text = self.tokenizer.render(messages)
        else:
            text = prompt
        ids = self.tokenizer.encode(text)
        limit = self.manifest.max_context - 1
        if len(ids) > limit:
            raise PromptError(f"the prompt is {len(ids)} tokens; this model takes at most {limit} "
                              "plus one generated token: shorten it")
        return ids

    # -- generation -----------------------------------------------------------
    def stream(self, prompt: str, image=None, max_new_tokens: int = 64, k: int | None = None,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               stop: list[str] | None = None, system: str | None = None, chat: bool = True,
               ignore_eos: bool = False, use_memory: bool = True, k_margin: float | None = None,
               result: Result | None = None) -> Iterator[str]:
        """Yield the generated text piece by piece; fills ``result`` when given.

        With a memory bank, the ``k`` best entries (default: the device profile's k;
        0 = none, the bank's prompt layout still applies) are injected as past KV;
        ``use_memory=False`` ignores the bank (plain chat prompt); ``k_margin`` keeps only
        entries scoring within that much of the best (adaptive k, at most ``k``)."""
        t0 = time.perf_counter()
        if max_new_tokens < 1:
            raise InduceKVError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        cfg = SamplingConfig(temperature, top_k, top_p, seed)
        rng = np.random.default_rng(seed)
        res = result if result is not None else Result("", [], "length")
        tm = res.timings
        img = None
        if image is not None:
            ti = time.perf_counter()
            img = self.encode_image(image)
            tm.image_ms = (time.perf_counter() - ti) * 1e3
        if self.memory is not None and use_memory:
            ids, cache, pos = self._with_memory(prompt, k, system, res, k_margin, img)
        else:
            ids, cache, pos = (self.encode_prompt(prompt, system=system, chat=chat, image=img),
                               KVCache.empty(self.manifest), 0)
        tm.prompt_tokens = len(ids)
        t1 = time.perf_counter()
        tm.tokenize_ms = (t1 - t0) * 1e3 - tm.image_ms - tm.key_ms - tm.retrieval_ms - tm.dequant_ms
        budget = min(max_new_tokens, self.manifest.max_context - pos - len(ids))

        logits, cache = self.decoder.forward(ids, cache, positions=np.arange(pos, pos + len(ids)),
                                             features=img.features if img is not None else None)
        pos += len(ids)
        tm.prefill_ms = (time.perf_counter() - t1) * 1e3
        out: list[int] = []
        emitted = ""
        stop = [s for s in (stop or []) if s]
        t_first = None
        res.stop_reason = "length"
        while True:
            nxt = choose(logits[-1], cfg, rng)
            if t_first is None:
                t_first = time.perf_counter()
                tm.ttft_ms = (t_first - t0) * 1e3
            if nxt in self.eos_ids and not ignore_eos:
                res.stop_reason = "eos"
                break
            out.append(nxt)
            text = self.tokenizer.decode(out)
            cut = _first_stop(text, stop)
            if cut is not None:
                text = text[:cut]
                res.stop_reason = "stop"
            if not text.endswith("\ufffd") and len(text) > len(emitted):  # wait for whole UTF-8 chars
                piece, emitted = text[len(emitted):], text
                yield piece
            if res.stop_reason == "stop" or len(out) >= budget:
                break
            logits, cache = self.decoder.forward([nxt], cache, positions=np.array([pos]))
            pos += 1
        tm.new_tokens = len(out)
        tm.decode_ms = (time.perf_counter() - t_first) * 1e3 if t_first else 0.0
        res.token_ids = out
        res.text = emitted if res.stop_reason == "stop" else self.tokenizer.decode(out)

    def _with_memory(self, prompt: str, k: int | None, system: str | None, res: Result, margin: float | None,
                     img=None):
        """Query ids, past KV (prefix + retrieved entries) and the query's first position."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("the prompt is empty; pass some text")
        k = self.profile.k if k is None else k
        if k < 0:
            raise InduceKVError(f"k must be >= 0, got {k}")
        layout = self.memory.layout(system)
        found = self.memory.retrieve(prompt, k, res.timings, margin, image=img) if k > 0 else []
        res.entries = [info for info, _ in found]
        t = time.perf_counter()
        cache, pos = layout.assemble_payloads([(buf, info["tokens"]) for info, buf in found], self.memory.bank.geo.scheme)
        res.timings.dequant_ms = (time.perf_counter() - t) * 1e3
        ids = layout.query_ids(prompt, img)
        limit = self.manifest.max_context - 1
        if pos + len(ids) > limit:
            raise PromptError(f"the prompt with {len(found)} memory entries is {pos + len(ids)} tokens; this model "
                              f"takes at most {limit}: shorten it or lower k")
        return ids, cache, pos

    def generate(self, prompt: str, image=None, max_new_tokens: int = 64, k: int | None = None,
                 **kw) -> Result:
        """Generate a full answer; see :meth:`stream` for the options."""
        res = Result("", [], "length")
        for _ in self.stream(prompt, image=image, max_new_tokens=max_new_tokens, k=k, result=res, **kw):
            pass
        return res


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
