"""Multimodal bundles from tiny random LLaVA and Idefics3 checkpoints: export, HF parity of
the whole image path (numpy preprocessing + vision graph + decoder), image-bearing memory
entries, ikv-learn on an image task, and bad input."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from inducekv.core import contract
from inducekv.memory.bank import Bank
from inducekv.runtime.api import Runtime
from inducekv.core.errors import InduceKVError
from learnutil import add_all
from inducekv.runtime.session import KVCache, KeyEncoder
from inducekv.runtime.vision import with_image

ARCHS = ("llava", "idefics3")


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    from vlmutil import make_idefics3, make_llava

    root = tmp_path_factory.mktemp("tiny-vlm")
    return {"llava": make_llava(root / "llava"), "idefics3": make_idefics3(root / "idefics3")}


@pytest.fixture(scope="module")
def vlm_bundles(vlm_dirs, tmp_path_factory):
    from inducekv.export.build import export_bundle

    root = tmp_path_factory.mktemp("tiny-vlm-bundles")
    out = {}
    for arch, d in vlm_dirs.items():
        _, report = export_bundle(str(d), root / arch, progress=False)
        assert report["max_abs_logit_diff"] < 1e-3 and report["image_tokens"] > 0
        out[arch] = root / arch
    return out


def _image(seed: int, h: int = 45, w: int = 60) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_bundle_has_vision_graph_embeddings_and_image_settings(vlm_bundles):
    for arch in ARCHS:
        m = json.loads((vlm_bundles[arch] / contract.MANIFEST_NAME).read_text())
        assert m["architecture"] == arch
        assert {contract.VISION_FILE, contract.EMBED_FILE, contract.KEY_FILE} <= set(m["files"])
        assert m["image"]["image_token_id"] > 0 and m["image"]["image_seq_len"] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_runtime_image_path_matches_hf(arch, vlm_dirs, vlm_bundles):
    """Runtime (numpy preprocessing, vision.onnx, embedding splice, decoder) vs the HF processor +
    model: same prompt ids, logits within 1e-3, same greedy continuation."""
    import torch
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration, LlavaForConditionalGeneration

    cls = {"llava": LlavaForConditionalGeneration, "idefics3": Idefics3ForConditionalGeneration}[arch]
    model = cls.from_pretrained(vlm_dirs[arch]).eval()
    from inducekv.export.vlm import load
    _, proc = load(vlm_dirs[arch])
    rt = Runtime.open(vlm_bundles[arch])
    prompt = "<image>What is in the picture?"
    for seed, (h, w) in enumerate([(45, 60), (90, 31)]):
        img = _image(seed, h, w)
        batch = proc(text=[prompt], images=[[Image.fromarray(img)]] if arch == "idefics3" else [Image.fromarray(img)],
                     return_tensors="pt")
        batch.pop("token_type_ids", None)
        enc = rt.encode_image(img)
        ids = rt.tokenizer.encode(with_image(prompt, enc, rt.manifest))
        assert ids == batch["input_ids"][0].tolist()
        got, _ = rt.decoder.forward(ids, KVCache.empty(rt.manifest), features=enc.features)
        with torch.no_grad():
            ref = model(**batch).logits[0].numpy()
            gen = model.generate(**batch, do_sample=False, max_new_tokens=6, min_new_tokens=6)[0, len(ids):].tolist()
        assert np.abs(got - ref).max() < 1e-3
        res = rt.generate(prompt, image=img, chat=False, max_new_tokens=6, ignore_eos=True)
        assert res.token_ids == gen
        assert res.timings.image_ms > 0


def test_image_entry_injected_equals_joint_prefill(vlm_bundles):
    """An image-bearing entry (its image tokens' K/V in the payload) injected where it was
    computed reproduces a joint prefill of prefix + entry + image query."""
    from vlmutil import injected_vs_joint

    injected, joint = injected_vs_joint(vlm_bundles["idefics3"], _image(1), _image(2))
    assert np.abs(injected - joint).max() <= 1e-3


def test_key_sees_the_image(vlm_bundles):
    rt = Runtime.open(vlm_bundles["llava"])
    keys = KeyEncoder(rt.bundle_dir, rt.manifest, rt.profile)
    from inducekv.runtime.memory import key_of

    k1 = key_of(rt, keys, "What is it?", rt.encode_image(_image(1)))
    k1b = key_of(rt, keys, "What is it?", rt.encode_image(_image(1)))
    k2 = key_of(rt, keys, "What is it?", rt.encode_image(_image(2)))
    np.testing.assert_array_equal(k1, k1b)
    assert np.abs(k1 - k2).max() > 1e-4


def _image_task(tmp_path, n=6):
    lines = []
    for i in range(n):
        Image.fromarray(_image(100 + i)).save(tmp_path / f"img{i}.png")
        lines.append(json.dumps({"prompt": "What is the code word?", "answer": f"word{i}", "image": f"img{i}.png"}))
    task = tmp_path / "codes.jsonl"
    task.write_text("\n".join(lines) + "\n")
    return task


def test_learn_image_task_and_retrieve_by_image(vlm_bundles, tmp_path):
    from inducekv.learn.cli import cli

    task = _image_task(tmp_path)
    bank = tmp_path / "bank.ikv"
    r = CliRunner().invoke(cli, ["--bundle", str(vlm_bundles["idefics3"]), "--memory", str(bank), "--task", str(task),
                                 "--budget", "8MiB", "--quiet", "--json", "--strategy", "full"])   # keep all six
    assert r.exit_code == 0, r.output
    b = Bank.open(bank)
    assert len(b.slots()) == 6
    anchors = b.anchors("codes")
    assert anchors and all("image" in a for a in anchors)
    rt = Runtime.open(vlm_bundles["idefics3"], memory=bank)
    for i in (0, 3, 5):  # the same image retrieves its own entry first
        res = rt.generate("What is the code word?", image=str(tmp_path / f"img{i}.png"), k=1, max_new_tokens=2)
        assert res.entries
        got = [e for e in b.entries() if e.entry_id == res.entries[0]["id"]][0]
        assert got.example_hash == _hash_for(tmp_path, i)


def _hash_for(tmp_path, i):
    from inducekv.memory.bank import example_hash

    return example_hash({"prompt": "What is the code word?", "answer": f"word{i}", "image": str((tmp_path / f"img{i}.png").resolve())})


def test_learn_adds_image_dicts(vlm_bundles, tmp_path):
    rt = Runtime.open(vlm_bundles["llava"])
    Image.fromarray(_image(7)).save(tmp_path / "a.png")
    b = Bank.create_for(tmp_path / "b.ikv", 4 << 20, rt.manifest, scheme="int8", max_tokens=128)
    slots = add_all(rt, b, [{"prompt": "Name?", "answer": "Zed", "image": str(tmp_path / "a.png")}], "t")
    assert len(slots) == 1
    assert b.entry(slots[0]).tokens > rt.manifest.image["image_seq_len"]


def test_text_bundle_refuses_images(tiny_bundles):
    rt = Runtime.open(tiny_bundles["fp32"])
    with pytest.raises(InduceKVError, match="text-only"):
        rt.generate("What is this?", image=_image(0))


def test_bad_images_are_one_line_errors(vlm_bundles, tmp_path):
    from inducekv.runtime.cli import cli

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    for path in (bad, tmp_path / "missing.png"):
        r = CliRunner().invoke(cli, ["--bundle", str(vlm_bundles["llava"]), "--prompt", "What?", "--image", str(path)])
        assert r.exit_code == 2, r.output
        assert "cannot read image" in r.output and len(r.output.strip().splitlines()) == 1
    rt = Runtime.open(vlm_bundles["llava"])
    with pytest.raises(InduceKVError, match="image tokens"):
        rt.generate("<image> typed by hand", max_new_tokens=1)


def test_image_path_runs_without_torch(vlm_bundles, tmp_path):
    """Preprocessing, vision graph, image generation and learning an image task, with torch,
    transformers and onnx blocked from import."""
    import subprocess
    import sys
    import textwrap

    from test_torch_free import BLOCKER

    task = _image_task(tmp_path, n=3)
    script = BLOCKER + textwrap.dedent("""
        import json
        from pathlib import Path
        from inducekv.runtime import Runtime
        from inducekv.learn import absorb, open_or_create, read_examples
        bundle, task = sys.argv[1], Path(sys.argv[2])
        rt = Runtime.open(bundle)
        r = rt.generate("What?", image=str(task.parent / "img0.png"), max_new_tokens=3, ignore_eos=True)
        with open_or_create(task.parent / "b.ikv", rt, 4_000_000, "int8", max_tokens=128) as bank:
            plan = absorb(rt, bank, read_examples(task), "codes", n_anchors=1, strategy="full")
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({"tokens": len(r.token_ids), "added": len(plan.add), "heavy": heavy}))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(vlm_bundles["idefics3"]), str(task)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"tokens": 3, "added": 3, "heavy": []}


def _set_questions(path, value):
    from inducekv.memory.format import QUESTIONS_KEY

    with Bank.open(path, writable=True) as b, b.transaction() as tx:
        tx.set_extra(QUESTIONS_KEY, value)


def test_an_image_task_gets_a_question_gate_that_decides_by_the_question(vlm_bundles, tmp_path):
    """The learn stores the task's question key (one: every prompt is the same) and no margin
    gate; a query is answered with memory only when its question is nearer to the task's than
    to the reference questions, and a closed gate answers exactly as without memory."""
    from inducekv.learn.cli import cli
    from inducekv.runtime import questions as qgate
    from inducekv.runtime.memory import RELEVANCE_KEY, key_of

    task, bank = _image_task(tmp_path), tmp_path / "bank.ikv"
    r = CliRunner().invoke(cli, ["--bundle", str(vlm_bundles["idefics3"]), "--memory", str(bank), "--task", str(task),
                                 "--budget", "8MiB", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "question gate: entries of codes" in r.output
    from inducekv.memory.cli import cli as bank_cli
    info = CliRunner().invoke(bank_cli, ["info", str(bank)])
    assert info.exit_code == 0 and "questions  codes (1 key)" in info.output, info.output
    rt = Runtime.open(vlm_bundles["idefics3"])
    keys = rt.key_encoder()
    prompt = "What is the code word?"
    with Bank.open(bank) as b:
        asked = qgate.questions_from(b.catalog, b.geo.key_dim)
        assert "codes" not in (b.catalog["extra"].get(RELEVANCE_KEY) or {})
    text = qgate.unit(key_of(rt, keys, prompt))
    assert list(asked) == ["codes"] and asked["codes"].shape == (1, keys.dim)
    np.testing.assert_allclose(asked["codes"][0], text, atol=2e-3)            # the prompt's own text key (fp16)
    img = str(tmp_path / "img2.png")
    assert rt.generate(prompt, image=img, k=1, max_new_tokens=2, memory=rt.open_memory(bank)).entries
    plain = rt.generate(prompt, image=img, max_new_tokens=4, use_memory=False)
    _set_questions(bank, {"version": qgate.VERSION, "tasks": {"codes": qgate.pack(-text)}})   # farthest possible
    mem = rt.open_memory(bank)
    look = mem.lookup(prompt, 1, image=rt.encode_image(img))
    assert look.found == [] and look.gated == 1
    closed = rt.generate(prompt, image=img, k=1, max_new_tokens=4, memory=mem)
    assert closed.entries == [] and closed.token_ids == plain.token_ids
    # another image task's nearer questions close it too; a reference question is never this task's
    _set_questions(bank, {"version": qgate.VERSION, "tasks": {"codes": qgate.pack(text + 0.2 * mem.reference()[0]),
                                                              "other": qgate.pack(text)}})
    assert rt.open_memory(bank).lookup(prompt, 1, image=rt.encode_image(img)).found == []
    ref = qgate.REFERENCE[3]
    _set_questions(bank, {"version": qgate.VERSION, "tasks": {"codes": qgate.pack(key_of(rt, keys, ref) * 2.0)}})
    assert rt.open_memory(bank).lookup(ref, 1, image=rt.encode_image(img)).found    # a tie opens it


@pytest.mark.parametrize("bad, match", [
    ({"version": 1, "tasks": {"codes": ["not base64!"]}}, "question gates are malformed"),
    ({"version": 1, "tasks": {"codes": []}}, "question gates are malformed"),
    ({"version": 1, "tasks": ["codes"]}, "question gates are malformed"),
    ({"version": 1, "tasks": {"codes": ["AAAA"]}}, "question gates are malformed"),      # wrong length
    ({"version": 99, "tasks": {}}, "question gates are version 99"),
])
def test_a_malformed_question_gate_is_refused_in_one_line(vlm_bundles, tmp_path, bad, match):
    task, bank = _image_task(tmp_path, n=3), tmp_path / "bank.ikv"
    rt = Runtime.open(vlm_bundles["idefics3"])
    with Bank.create_for(bank, 4 << 20, rt.manifest, scheme="int8", max_tokens=128) as b:
        add_all(rt, b, [json.loads(x) | {"image": str(tmp_path / json.loads(x)["image"])}
                        for x in task.read_text().splitlines()], "codes")
    _set_questions(bank, bad)
    with pytest.raises(InduceKVError, match=match):
        rt.generate("What is the code word?", image=str(tmp_path / "img0.png"), k=1, max_new_tokens=2,
                    memory=rt.open_memory(bank))


def test_question_gate_rule_and_farthest_first_keys():
    from inducekv.runtime import questions as qgate

    e = np.eye(4, dtype=np.float32)
    tasks = {"a": e[:1], "b": e[1:2]}
    ref = e[2:3]
    assert qgate.is_open(e[0] + 0.1 * e[2], "a", tasks, ref)
    assert not qgate.is_open(e[0] + 0.1 * e[2], "b", tasks, ref)      # nearer to task a's question
    assert not qgate.is_open(e[2] + 0.5 * e[0], "a", tasks, ref)      # nearer to a reference question
    assert qgate.is_open(e[0] + e[2], "a", tasks, ref)                # a tie opens
    many = np.stack([e[0], e[0] * 3, e[1], e[0] + 1e-4 * e[3], e[2], e[3], e[0] + e[1]])
    picked = qgate.farthest(many, 4)
    assert picked.shape == (4, 4)
    np.testing.assert_allclose(np.sort(np.abs(picked).argmax(1)), [0, 1, 2, 3])
    assert qgate.farthest(np.stack([e[0], 2 * e[0]])).shape == (1, 4)   # copies: one key
    back = qgate.questions_from({"extra": {"questions": {"version": qgate.VERSION, "tasks": {"a": qgate.pack(picked)}}}}, 4)
    np.testing.assert_allclose(back["a"], picked, atol=1e-3)
