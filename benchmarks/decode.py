"""Decode speed and quality: inducekv vs onnxruntime-genai on the default model.

    python benchmarks/decode.py [--bundles DIR] [--precisions fp32,int8,int4] [--tokens 64]
                                [--threads 2] [--rounds 3] [--load N] [--work DIR] [--json]

Per precision, in one run and interleaved (the order flips every round): inducekv's
``Runtime.generate`` and onnxruntime-genai's ``Generator`` produce ``--tokens`` greedy
tokens (EOS ignored) after the same prompt tokens, with the same intra-op thread count.
Decode tok/s = (tokens - 1) / time after the first token; TTFT = call start to the first
token chosen (ours includes rendering the chat template and tokenizing). Medians over
rounds. ``--load N`` runs N busy processes (pure-Python spin loops at normal priority) during
the timed rounds, as other work on a device would; the load average is reported before and
after them. Quality: argmax agreement of int8/int4 with the same system's fp32 on
teacher-forced answer positions (plain onnxruntime on genai's model.onnx).

Built once and cached under ``--work`` (default ~/.cache/inducekv-bench):
``bundles/P`` (``export_bundle``, unless ``--bundles`` is given; rebuilt when the exporter's
sources changed since), ``hf/`` (the GGUF
saved as an HF checkpoint) and ``genai/P`` (``onnxruntime_genai.models.builder``).
With transformers 4.57 the builder needs three work-arounds, applied here:
its module imports two Qwen3.5 classes that only transformers 5 has (stubbed; they
are not used for Llama), it iterates ``config.rope_scaling`` which 4.57 saves as null
(saved as ``{"rope_type": "default"}``), and the tokenizer transformers builds from the
GGUF names ``<|im_start|>`` as EOS (``tokenizer_config.json`` gets ``<|im_end|>``,
otherwise genai also stops at id 1) and adds BOS although the GGUF says not to.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from inducekv.devices.profile import load_profile
from inducekv.runtime import Runtime
from inducekv.core.errors import InduceKVError
from inducekv.runtime.session import KVCache

PROMPT = "Write a long story about a brave knight and a dragon."
PRECISIONS = ("fp32", "int8", "int4")
QA = [  # teacher-forced quality texts: the answers' tokens are scored
    ("What causes the seasons on Earth?",
     "The seasons are caused by the tilt of Earth's axis, about 23.5 degrees. As Earth orbits the Sun, "
     "one hemisphere leans toward it and receives more direct sunlight and longer days, which makes summer, "
     "while the other hemisphere leans away and has winter."),
    ("How do I make a cup of tea?",
     "Boil fresh water, then pour it over a tea bag or loose leaves in a cup. Let it steep for three to five "
     "minutes, depending on how strong you like it. Remove the tea, and add milk, sugar, honey or lemon "
     "if you wish. Stir and enjoy it while it is hot."),
    ("Explain what a computer program is.",
     "A computer program is a list of instructions that tells a computer what to do. Programmers write these "
     "instructions in a programming language such as Python or C, and the computer follows them step by step "
     "to solve a problem, process data, or control a device."),
    ("Why is exercise good for you?",
     "Regular exercise strengthens the heart and lungs, builds muscle and bone, and helps control body weight. "
     "It also improves sleep and mood, because physical activity releases chemicals in the brain that reduce "
     "stress. Even a short daily walk lowers the risk of many diseases."),
    ("Describe the water cycle.",
     "Water evaporates from oceans, lakes and rivers when the Sun heats it, and rises into the air as vapour. "
     "The vapour cools and condenses into clouds. When the droplets grow heavy, they fall back as rain or snow, "
     "which flows into rivers and soaks into the ground, and the cycle begins again."),
]

_BUILDER = """
import runpy, sys
import transformers
transformers.Gemma3ForConditionalGeneration  # with transformers 4.57 this swaps sys.modules['transformers']
t = sys.modules['transformers']
for name in ('Qwen3_5ForConditionalGeneration', 'Qwen3_5MoeForConditionalGeneration'):  # transformers 5 only
    if not hasattr(t, name):
        setattr(t, name, type(name, (), {}))
sys.argv = ['builder', *sys.argv[1:]]
runpy.run_module('onnxruntime_genai.models.builder', run_name='__main__', alter_sys=True)
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- building (cached) ---------------------------------------------------------
def exporter_stamp() -> str:
    """A hash of the exporter's sources: a cached bundle built by other code is rebuilt."""
    import hashlib

    import inducekv.export

    h = hashlib.sha256()
    for f in sorted(Path(inducekv.export.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def ensure_bundle(root: Path, precision: str, cached: bool = True) -> Path:
    """``root/precision``, exported when missing; in the cache (``cached``) also when the
    exporter changed since it was built (``.exporter-stamp``)."""
    out = root / precision
    stamp = out / ".exporter-stamp"
    fresh = (out / "manifest.json").is_file() and (
        not cached or (stamp.is_file() and stamp.read_text() == exporter_stamp()))
    if not fresh:
        from inducekv.export.build import export_bundle

        log(f"exporting inducekv {precision} bundle to {out}")
        export_bundle("default", out, weights=precision, progress=False, force=True)
        if cached:
            stamp.write_text(exporter_stamp())
    return out


def ensure_hf(work: Path) -> Path:
    """The default GGUF saved as an HF checkpoint the genai builder can read."""
    out = work / "hf"
    if (out / "config.json").is_file():
        return out
    from inducekv.export import source

    log(f"saving the default model as an HF checkpoint in {out}")
    model, tok = source.load(source.resolve("default"))
    if model.config.rope_theta != 100000.0:
        raise InduceKVError(f"the default model loaded with rope_theta {model.config.rope_theta}, expected 100000")
    tmp = Path(tempfile.mkdtemp(prefix=".hf-", dir=work))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    _patch_json(tmp / "config.json", rope_scaling={"rope_type": "default"})
    _patch_json(tmp / "tokenizer_config.json", eos_token="<|im_end|>", add_bos_token=False)
    tmp.chmod(0o755)  # mkdtemp makes it owner-only
    os.replace(tmp, out)
    return out


def _patch_json(path: Path, **updates) -> None:
    data = json.loads(path.read_text())
    data.update(updates)
    path.write_text(json.dumps(data, indent=2))


def ensure_genai(work: Path, precision: str) -> Path:
    out = work / "genai" / precision
    if (out / "genai_config.json").is_file():
        return out
    hf = ensure_hf(work)
    log(f"building the onnxruntime-genai {precision} model in {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{precision}-", dir=out.parent))
    logfile = work / f"genai-builder-{precision}.log"
    with open(logfile, "w") as f:
        rc = subprocess.run([sys.executable, "-c", _BUILDER, "-i", str(hf), "-o", str(tmp), "-p", precision,
                             "-e", "cpu", "-c", str(work / "genai-cache")], stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InduceKVError(f"the onnxruntime-genai builder failed for {precision}; see {logfile}")
    tmp.chmod(0o755)
    os.replace(tmp, out)
    return out


# -- the two systems -----------------------------------------------------------
class Ours:
    def __init__(self, bundle: Path, threads: int):
        profile = dataclasses.replace(load_profile("cpu"), intra_op_threads=threads, inter_op_threads=1)
        self.rt = Runtime.open(bundle, device=profile)
        self.rt.cache_prefix = False   # genai prefills the whole prompt: both systems prefill the same tokens

    def generate(self, n: int) -> tuple[list[int], float, float]:
        """(tokens, decode tok/s, TTFT ms)."""
        r = self.rt.generate(PROMPT, max_new_tokens=n, ignore_eos=True)
        return r.token_ids, r.timings.tokens_per_s, r.timings.ttft_ms

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.rt.decoder.forward(ids, KVCache.empty(self.rt.manifest))[0]          # (T, V)


class Genai:
    def __init__(self, model_dir: Path, threads: int, prompt_ids: list[int]):
        import onnxruntime as ort
        import onnxruntime_genai as og

        self.og, self.ids = og, prompt_ids
        cfg = og.Config(str(model_dir))
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(cfg)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
        self.sess = ort.InferenceSession(str(model_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
        conf = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
        self.layers, self.kv_heads, self.head_dim = conf["num_hidden_layers"], conf["num_key_value_heads"], conf["head_size"]

    def generate(self, n: int) -> tuple[list[int], float, float]:
        """(tokens, decode tok/s, TTFT ms); min_length = max_length keeps going past EOS."""
        t0 = time.perf_counter()
        params = self.og.GeneratorParams(self.model)
        total = len(self.ids) + n
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        gen = self.og.Generator(self.model, params)
        gen.append_tokens(self.ids)          # prefill
        gen.generate_next_token()            # picks from the prefill logits
        t1 = time.perf_counter()
        out = [int(gen.get_next_tokens()[0])]
        while not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        t2 = time.perf_counter()
        return out, (len(out) - 1) / (t2 - t1), (t1 - t0) * 1e3

    def logits(self, ids: list[int]) -> np.ndarray:
        feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)                # (1, H_kv, 0, D)
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"] = feed[f"past_key_values.{i}.value"] = empty
        return self.sess.run(["logits"], feed)[0][0]                                     # (T, V)


# -- measurements --------------------------------------------------------------
def start_load(n: int) -> list[subprocess.Popen]:
    """N processes that keep one core each busy until stopped."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()


def qa_sequences(rt: Runtime) -> list[tuple[list[int], int]]:
    """(ids of prompt + answer + end of turn, index of the first answer token) per QA pair."""
    out = []
    for q, a in QA:
        prompt = rt.encode_prompt(q)
        out.append((prompt + rt.tokenizer.encode(a + "<|im_end|>", bos=False), len(prompt)))
    return out


def _mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.onnx*")) / 1e6


def answer_argmax(system, seqs) -> np.ndarray:
    """Argmax at every position that predicts an answer token, all sequences concatenated."""
    return np.concatenate([system.logits(ids)[start - 1:-1].argmax(-1) for ids, start in seqs])


def run(args) -> dict:
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise InduceKVError('onnxruntime-genai is not installed; run `pip install -e ".[export,bench]"`')
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    bundles = Path(args.bundles).expanduser() if args.bundles else work / "bundles"
    precisions = [p.strip() for p in args.precisions.split(",")]
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or "fp32" not in precisions:
        raise InduceKVError(f"--precisions must include fp32 and only {', '.join(PRECISIONS)}, got {args.precisions!r}")
    paths = {p: (ensure_bundle(bundles, p, cached=not args.bundles), ensure_genai(work, p)) for p in precisions}

    ours = {p: Ours(paths[p][0], args.threads) for p in precisions}
    prompt_ids = ours["fp32"].rt.encode_prompt(PROMPT)
    genai = {p: Genai(paths[p][1], args.threads, prompt_ids) for p in precisions}
    systems = {"ours": ours, "genai": genai}

    runs = {(s, p): [] for s in systems for p in precisions}
    tokens = {}
    for s in systems:  # warm-up, untimed
        for p in precisions:
            tokens[(s, p)] = systems[s][p].generate(args.tokens)[0]
    load = start_load(args.load)
    loadavg = [os.getloadavg()]
    try:
        for r in range(args.rounds):
            log(f"round {r + 1}/{args.rounds}")
            for p in precisions:
                for s in (("ours", "genai") if r % 2 == 0 else ("genai", "ours")):
                    _, tps, ttft = systems[s][p].generate(args.tokens)
                    runs[(s, p)].append((tps, ttft))
        loadavg.append(os.getloadavg())
    finally:
        stop_load(load)

    seqs = qa_sequences(ours["fp32"].rt)
    argmax = {(s, p): answer_argmax(systems[s][p], seqs) for s in systems for p in precisions}
    gold = np.concatenate([ids[start:] for ids, start in seqs])                          # the answer tokens
    fp32_diff = float(np.abs(ours["fp32"].logits(seqs[0][0]) - genai["fp32"].logits(seqs[0][0])).max())

    rows = {}
    for p in precisions:
        med = {s: (statistics.median(x[0] for x in runs[(s, p)]), statistics.median(x[1] for x in runs[(s, p)]))
               for s in systems}
        rows[p] = {
            "ours_tok_s": med["ours"][0], "genai_tok_s": med["genai"][0], "ratio": med["ours"][0] / med["genai"][0],
            "ours_ttft_ms": med["ours"][1], "genai_ttft_ms": med["genai"][1],
            "ours_argmax_vs_fp32": float((argmax[("ours", p)] == argmax[("ours", "fp32")]).mean()),
            "genai_argmax_vs_fp32": float((argmax[("genai", p)] == argmax[("genai", "fp32")]).mean()),
            "ours_top1_vs_text": float((argmax[("ours", p)] == gold).mean()),
            "genai_top1_vs_text": float((argmax[("genai", p)] == gold).mean()),
            "ours_mb": _mb(paths[p][0]), "genai_mb": _mb(paths[p][1]),
            "greedy_tokens_equal": tokens[("ours", p)] == tokens[("genai", p)],
        }
    import onnxruntime
    import onnxruntime_genai

    return {
        "ratios": {p: rows[p]["ratio"] for p in precisions},
        "rows": rows,
        "quality_positions": len(argmax[("ours", "fp32")]),
        "fp32_max_abs_logit_diff_ours_vs_genai": fp32_diff,
        "setup": {"prompt_tokens": len(prompt_ids), "new_tokens": args.tokens, "threads": args.threads,
                  "rounds": args.rounds, "load": args.load,
                  "loadavg_before_after": loadavg, "cpu_count": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
                  "onnxruntime_genai": onnxruntime_genai.__version__},
    }


def print_table(res: dict) -> None:
    s = res["setup"]
    print(f"decode of {s['new_tokens']} greedy tokens after a {s['prompt_tokens']}-token prompt, {s['threads']} threads, "
          f"median of {s['rounds']} rounds ({s['cpu_count']} cores; onnxruntime {s['onnxruntime']}, "
          f"onnxruntime-genai {s['onnxruntime_genai']}); {s['load']} busy processes, load average "
          f"{s['loadavg_before_after'][0][0]:.2f} before and {s['loadavg_before_after'][-1][0]:.2f} after the rounds")
    print(f"{'weights':<8}{'ours tok/s':>11}{'genai tok/s':>12}{'ratio':>7}{'ours TTFT ms':>13}{'genai TTFT ms':>14}"
          f"{'same tokens':>12}")
    for p, r in res["rows"].items():
        print(f"{p:<8}{r['ours_tok_s']:>11.1f}{r['genai_tok_s']:>12.1f}{r['ratio']:>7.2f}{r['ours_ttft_ms']:>13.0f}"
              f"{r['genai_ttft_ms']:>14.0f}{str(r['greedy_tokens_equal']):>12}")
    print(f"\nquality on {res['quality_positions']} teacher-forced answer positions: argmax agreement with the same "
          f"system's fp32, and top-1 = the text's next token")
    print(f"{'weights':<8}{'agree ours':>11}{'agree genai':>12}{'top-1 ours':>11}{'top-1 genai':>12}"
          f"{'MB ours':>9}{'MB genai':>9}")
    for p, r in res["rows"].items():
        print(f"{p:<8}{r['ours_argmax_vs_fp32']:>11.1%}{r['genai_argmax_vs_fp32']:>12.1%}{r['ours_top1_vs_text']:>11.1%}"
              f"{r['genai_top1_vs_text']:>12.1%}{r['ours_mb']:>9.0f}{r['genai_mb']:>9.0f}")
    print(f"fp32 ours vs genai: max |dlogit| {res['fp32_max_abs_logit_diff_ours_vs_genai']:.2g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", help="Folder with our fp32/int8/int4 bundles (default: WORK/bundles, exported if missing).")
    ap.add_argument("--precisions", default="fp32,int8,int4")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--load", type=int, default=0, help="Busy processes running during the timed rounds.")
    ap.add_argument("--work", default="~/.cache/inducekv-bench", help="Cache of built models.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.tokens < 2 or args.threads < 1 or args.rounds < 1 or args.load < 0:
        ap.error("--tokens must be >= 2, --threads and --rounds >= 1, --load >= 0")
    try:
        res = run(args)
    except InduceKVError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.json:
        print(json.dumps(res))
    else:
        print_table(res)


if __name__ == "__main__":
    main()
