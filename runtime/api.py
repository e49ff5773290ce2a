"""The Python API an embedded app calls.

    rt = Runtime.open("bundle/", device="cpu")
    r = rt.generate("What is the capital of France?", max_new_tokens=32)
    r.text, r.entries, r.timings
    for piece in rt.stream("Tell me a story"): ...

One ``Runtime`` may serve ``generate``/``stream`` calls from several threads at once, with
or without memory (onnxruntime sessions run concurrently; what memory shares is guarded
in ``runtime.memory``); each call gives the same output as it would alone. A ``Prepared``
prompt with memory holds the calling thread's past-KV buffers: decode it before that
thread prepares the next one.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from inducekv.devices.profile import DeviceProfile, load_profile
from inducekv.core import contract
from inducekv.core.manifest import Manifest, read_manifest
from inducekv.core.errors import BundleError, InduceKVError, PromptError
from inducekv.kernels import kvquant
from inducekv.runtime.sampling import DEFAULT_MAX_NEW_TOKENS, SamplingConfig, choose
from inducekv.runtime.session import Decoder, KVCache
from inducekv.runtime.steps import InPlaceSteps
from inducekv.runtime.tokenizer import ChatTokenizer
from inducekv.runtime.memory import Injection, entry_bias
from inducekv.runtime.prefix import PlainPrefix
from inducekv.runtime.vision import with_image

log = logging.getLogger(__name__)


@dataclass
class Timings:
    tokenize_ms: float = 0.0       # render the chat template + encode
    image_ms: float = 0.0          # image preprocessing + vision graph (image prompts only)
    key_ms: float = 0.0            # retrieval-key pass + calibration (memory only)
    retrieval_ms: float = 0.0      # index search (memory only)
    dequant_ms: float = 0.0        # read + checksum + dequantize entries, + re-encode source entries (memory only)
    source_ms: float = 0.0         # of which: re-encoding retrieved source entries (a bank with source entries)
    prefix_ms: float = 0.0         # prefill of a shared prefix: the memory layout's or the plain chat prompt's (first use only, then cached)
    prefill_ms: float = 0.0        # the prompt through the decoder
    ttft_ms: float = 0.0           # call start to first token chosen
    decode_ms: float = 0.0         # all tokens after the first
    prompt_tokens: int = 0         # tokens prefilled by this call (a cached prefix's are not counted)
    new_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens after the first, per second of decode."""
        return (self.new_tokens - 1) / (self.decode_ms / 1e3) if self.new_tokens > 1 and self.decode_ms > 0 else 0.0

    def as_dict(self) -> dict:
        return {"tokenize_ms": self.tokenize_ms, "image_ms": self.image_ms, "key_ms": self.key_ms, "retrieval_ms": self.retrieval_ms,
                "dequant_ms": self.dequant_ms, "source_ms": self.source_ms, "prefix_ms": self.prefix_ms, "prefill_ms": self.prefill_ms, "ttft_ms": self.ttft_ms,
                "decode_ms": self.decode_ms, "prompt_tokens": self.prompt_tokens,
                "new_tokens": self.new_tokens, "tokens_per_s": self.tokens_per_s}


@dataclass
class Prepared:
    """A prompt ready to decode (``Runtime.prepare``): what the decoder sees before the first token."""
    ids: list[int]                       # tokens to prefill
    cache: KVCache                       # past KV before them: empty, or shared prefix + injected entries
    pos: int                             # position of ids[0]
    features: np.ndarray | None = None   # (n_image_tokens, hidden) rows for the image tokens in ids
    entries: list[dict] = field(default_factory=list)  # retrieved memory entries (id, task, score, tokens, weight)
    bias: np.ndarray | None = None       # (cache.length,) or (L, cache.length) attention bias on the past, or None


@dataclass
class Result:
    text: str
    token_ids: list[int]
    stop_reason: str                      # "eos" | "stop" | "length"
    entries: list[dict] = field(default_factory=list)  # retrieved memory entries (id, task, score)
    timings: Timings = field(default_factory=Timings)


class Runtime:
    """A frozen decoder from a bundle, ready to generate (torch-free)."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, profile: DeviceProfile, learn: bool = False):
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.profile = profile
        st = manifest.special_tokens
        self.tokenizer = ChatTokenizer(bundle_dir / contract.TOKENIZER_FILE, manifest.chat_template,
                                       st.get("bos_token_id"), manifest.add_bos_token)
        self.decoder = Decoder(bundle_dir, manifest, profile, probe=learn)
        self.eos_ids = set(int(i) for i in st.get("eos_token_ids", []))
        self.memory = None  # runtime.memory.Memory when opened with a bank
        self._warned_bias = False
        self._vision = None
        self._keys = None
        self._lazy_lock = threading.Lock()  # the vision and key sessions are opened once, on first use
        self.plain_prefix = PlainPrefix(self)   # a plain chat prompt's shared start, prefilled once
        self.cache_prefix = True                # False: prefill every plain prompt whole (benchmarks/decode.py)

    def encode_image(self, image):
        """An image (path, PIL image or uint8 array) as ``vision.ImageInput``: its features and
        the placeholder text that stands for it in a prompt. Text-only bundles refuse it."""
        if self._vision is None:
            from inducekv.runtime.vision import Vision

            with self._lazy_lock:
                if self._vision is None:
                    self._vision = Vision(self.bundle_dir, self.manifest, self.profile)
        return self._vision.encode(image)

    def key_encoder(self):
        """The retrieval-key pass (``session.KeyEncoder``), opened on first use and shared by
        every bank this runtime serves or learns into."""
        if self._keys is None:
            from inducekv.runtime.session import KeyEncoder

            with self._lazy_lock:
                if self._keys is None:
                    self._keys = KeyEncoder(self.bundle_dir, self.manifest, self.profile)
        return self._keys

    @classmethod
    def open(cls, bundle: str | Path, memory: str | Path | None = None, device: str | DeviceProfile = "cpu",
             verify: bool = False, learn: bool = False) -> "Runtime":
        """Open a bundle, and a memory bank (.ikv) to retrieve from; ``verify`` re-hashes
        every bundle file against the manifest. ``learn``: this runtime will also learn
        (``inducekv.learn``): its decoder is the bundle's probe graph, so learning needs no
        second copy of the weights (about half the RAM of a learn; decode ~2% slower)."""
        profile = device if isinstance(device, DeviceProfile) else load_profile(device)
        bundle_dir = Path(bundle)
        rt = cls(bundle_dir, read_manifest(bundle_dir, verify_hashes=verify), profile, learn=learn)
        if memory is not None:
            rt.memory = rt.open_memory(memory)
        return rt

    def open_memory(self, path: str | Path):
        """A bank (.ikv) opened for retrieval with this model (``runtime.memory.Memory``): pass it
        as ``memory=`` to ``generate``/``stream`` to use it for a call."""
        from inducekv.memory.bank import Bank
        from inducekv.runtime.memory import Memory
        from inducekv.runtime.session import require_memory_support

        require_memory_support(self.manifest)   # before the bank is opened
        return Memory(self, Bank.open(path, fingerprint=self.manifest.fingerprint))

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
    def prepare(self, prompt: str, image=None, k: int | None = None, system: str | None = None, chat: bool = True,
                memory=None, use_memory: bool = True, k_margin: float | None = None,
                timings: Timings | None = None) -> Prepared:
        """Everything before the first decoder pass: image, retrieval, past KV layout, query ids.

        ``memory``: a ``runtime.memory.Memory`` for this call (default: the bank the runtime
        was opened with); ``use_memory=False`` ignores any. See :meth:`stream` for the rest."""
        t0 = time.perf_counter()
        tm = timings if timings is not None else Timings()
        img = None
        if image is not None:
            ti = time.perf_counter()
            img = self.encode_image(image)
            tm.image_ms = (time.perf_counter() - ti) * 1e3
        mem = (memory if memory is not None else self.memory) if use_memory else None
        features = img.features if img is not None else None
        if mem is not None:
            if not chat:
                raise PromptError("chat=False cannot be used with memory (entries sit inside the chat template); "
                                  "pass use_memory=False for a raw prompt")
            prep = self._with_memory(mem, prompt, k, system, tm, k_margin, img)
        elif chat:
            prep = self._plain(prompt, system, img, tm)
        else:
            prep = Prepared(self.encode_prompt(prompt, chat=False, image=img), KVCache.empty(self.manifest), 0, features)
        tm.prompt_tokens = len(prep.ids)
        tm.tokenize_ms = ((time.perf_counter() - t0) * 1e3 - tm.image_ms - tm.key_ms - tm.retrieval_ms
                          - tm.dequant_ms - tm.prefix_ms)
        return prep

    def stream(self, prompt: str, image=None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, k: int | None = None,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               stop: list[str] | None = None, system: str | None = None, chat: bool = True,
               ignore_eos: bool = False, use_memory: bool = True, k_margin: float | None = None,
               result: Result | None = None, memory=None) -> Iterator[str]:
        """Yield the generated text piece by piece; fills ``result`` when given.

        With a memory bank, the ``k`` best entries (default: the device profile's k;
        0 = none, the bank's prompt layout still applies) are injected as past KV;
        ``use_memory=False`` ignores the bank (plain chat prompt); ``memory`` uses another
        opened bank (``open_memory``) for this call; ``k_margin`` keeps only entries scoring
        within that much of the best (adaptive k, at most ``k``)."""
        t0 = time.perf_counter()
        if max_new_tokens < 1:
            raise InduceKVError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        res = result if result is not None else Result("", [], "length")
        prep = self.prepare(prompt, image=image, k=k, system=system, chat=chat, memory=memory, use_memory=use_memory,
                            k_margin=k_margin, timings=res.timings)
        res.entries = prep.entries
        yield from self.decode(prep, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed, stop=stop, ignore_eos=ignore_eos, result=res, started=t0)

    def decode(self, prep: Prepared, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
               ignore_eos: bool = False, result: Result | None = None, started: float | None = None) -> Iterator[str]:
        """Prefill a prepared prompt and decode from it, yielding text pieces; fills ``result``.
        ``started``: ``time.perf_counter()`` at the call's start (TTFT counts from it)."""
        t0 = started if started is not None else time.perf_counter()
        if max_new_tokens < 1:
            raise InduceKVError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        cfg = SamplingConfig(temperature, top_k, top_p, seed)
        rng = np.random.default_rng(seed)
        res = result if result is not None else Result("", [], "length")
        tm = res.timings
        ids, pos = prep.ids, prep.pos
        budget = min(max_new_tokens, self.manifest.max_context - pos - len(ids))
        bias = None
        if prep.bias is not None:  # the entries' weights hold for every step: zeros after them
            b = np.asarray(prep.bias, np.float32)                              # (past,) or (L, past)
            bias = np.zeros(b.shape[:-1] + (prep.cache.length + len(ids) + budget,), np.float32)
            bias[..., :prep.cache.length] = b
        past = prep.cache.length
        t1 = time.perf_counter()
        logits, cache = self.decoder.forward(ids, prep.cache, positions=np.arange(pos, pos + len(ids)),
                                             features=prep.features,
                                             bias=bias[..., :past + len(ids)] if bias is not None else None,
                                             logits_from=len(ids) - 1)                # the last row's only
        last = logits[-1]
        steps = None   # graphs that append K/V in place decode on preallocated buffers (steps.py)
        past += len(ids)
        pos += len(ids)
        tm.prefill_ms = (time.perf_counter() - t1) * 1e3
        out: list[int] = []
        emitted = ""
        stop = [s for s in (stop or []) if s]
        t_first = None
        res.stop_reason = "length"
        while True:
            nxt = choose(last, cfg, rng)
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
            step_bias = bias[..., :past + 1] if bias is not None else None
            if steps is None and self.decoder.kv_shared:
                steps = InPlaceSteps(self.decoder, cache, past + budget - len(out) + 1)
            if steps is not None:
                last = steps.run([nxt], np.array([pos]), bias=step_bias)
            else:
                logits, cache = self.decoder.forward([nxt], cache, positions=np.array([pos]), bias=step_bias)
                last = logits[-1]
            past += 1
            pos += 1
        tm.new_tokens = len(out)
        tm.decode_ms = (time.perf_counter() - t_first) * 1e3 if t_first else 0.0
        res.token_ids = out
        res.text = emitted if res.stop_reason == "stop" else self.tokenizer.decode(out)

    def _with_memory(self, mem, prompt: str, k: int | None, system: str | None, tm: Timings, margin: float | None,
                     img=None) -> Prepared:
        """Query ids, past KV (prefix + retrieved entries) and the query's first position."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("the prompt is empty; pass some text")
        k = self.profile.k if k is None else k
        if k < 0:
            raise InduceKVError(f"k must be >= 0, got {k}")
        t = time.perf_counter()
        layout = mem.layout(system)   # the shared prefix is prefilled once per layout, then cached
        tm.prefix_ms = (time.perf_counter() - t) * 1e3
        look = mem.lookup(prompt, k, tm, margin, image=img)   # entries, weighting, scales: one bank state
        found, inj = look.found, look.injection
        if not found:   # nothing retrieved, or nothing passed the relevance gate: the plain prompt (zero-shot)
            return self._plain(prompt, system, img, tm)
        t = time.perf_counter()
        if not self.decoder.has_bias and inj.tau is not None:
            if not self._warned_bias:
                self._warned_bias = True   # a race here can only log the line twice
                log.warning("this bundle's decoder takes no attention bias: memory entries are injected "
                            "unweighted; re-export the bundle with this inducekv version")
            inj = Injection(None, inj.gates)
        if len(found) == 1 and found[0][0].get("kind") == "source":
            return self._one_source(layout, found[0], prompt, img, tm)
        order, weights = inj.plan([info["score"] for info, _ in found])
        found = [found[i] for i in order]                                   # injected ones, best last
        scheme = mem.bank.geo.scheme
        if scheme in kvquant.SPARSE and found and not self.decoder.has_bias:
            raise BundleError("this bank's entries are compacted per layer (--compact perlayer), which needs the "
                              "decoder's attention-bias input; re-export the bundle with this inducekv version")
        items = []
        for info, buf in found:
            if info.get("kind") == "source":   # the example itself: encoded now, as it was at learn time
                t1 = time.perf_counter()
                items.append(layout.encode_source(buf))
                info["tokens"] = items[-1][0].shape[2]
                tm.source_ms += (time.perf_counter() - t1) * 1e3
            else:
                items.append((buf, info["tokens"]))
        cache, pos, masks = layout.assemble_mixed(items, scheme, gates=inj.gates if found else None,
                                                  key_scale=look.key_scale)
        bias = entry_bias(layout.p0, [info["tokens"] for info, _ in found], weights, masks)
        for n, (info, _) in enumerate(found):
            info["weight"] = float(weights[n]) if weights is not None else 1.0
        found = found[::-1]                                                 # reported best first
        tm.dequant_ms = (time.perf_counter() - t) * 1e3
        ids = layout.query_ids(prompt, img)
        limit = self.manifest.max_context - 1
        if pos + len(ids) > limit:
            raise PromptError(f"the prompt with {len(found)} memory entries is {pos + len(ids)} tokens; this model "
                              f"takes at most {limit}: shorten it or lower k")
        return Prepared(ids, cache, pos, img.features if img is not None else None, [info for info, _ in found], bias)

    def _plain(self, prompt: str, system: str | None, img, tm: Timings) -> Prepared:
        """The plain chat prompt (no memory), after its cached shared start when there is one
        (``runtime.prefix``)."""
        ids = self.encode_prompt(prompt, system=system, chat=True, image=img)
        features = img.features if img is not None else None
        if self.cache_prefix:
            t = time.perf_counter()
            cut = self.plain_prefix.split(ids, system)
            tm.prefix_ms += (time.perf_counter() - t) * 1e3
            if cut is not None:
                return Prepared(cut[0], cut[1], cut[2], features)
        return Prepared(ids, KVCache.empty(self.manifest), 0, features)

    def _one_source(self, layout, found, prompt: str, img, tm: Timings) -> Prepared:
        """One retrieved source entry (k=1): its tokens and the query's are prefilled together
        after the cached shared prefix: the K/V it would have as a kv entry, in one decoder pass."""
        info, buf = found
        t = time.perf_counter()
        entry_ids, entry_feats = layout.source_ids(buf)
        tm.source_ms = (time.perf_counter() - t) * 1e3
        info["tokens"], info["weight"] = len(entry_ids), 1.0
        ids = entry_ids + layout.query_ids(prompt, img)
        feats = [f for f in (entry_feats, img.features if img is not None else None) if f is not None]
        if layout.p0 + len(ids) > self.manifest.max_context - 1:
            raise PromptError(f"the prompt with its memory entry is {layout.p0 + len(ids)} tokens; this model takes "
                              f"at most {self.manifest.max_context - 1}: shorten it")
        return Prepared(ids, layout.prefix_cache, layout.p0, np.concatenate(feats) if feats else None, [info], None)

    def generate(self, prompt: str, image=None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, k: int | None = None,
                 **kw) -> Result:
        """Generate a full answer; see :meth:`stream` for the options."""
        res = Result("", [], "length")
        for _ in self.stream(prompt, image=image, max_new_tokens=max_new_tokens, k=k, result=res, **kw):
            pass
        return res


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
