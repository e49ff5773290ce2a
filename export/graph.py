"""The native decoder graph for Llama-family models (and Qwen2/3, Gemma 3), built node by node.

Why not only optimum: its graph for SmolLM2 is ~7,400 nodes (3,153 after
onnxruntime's optimizer, most of them shape arithmetic), and at 135M
parameters the per-node overhead dominates a decode step. onnxruntime-genai's
builder makes a compact graph but has no ``position_ids`` input and treats the
mask as a length. This graph uses standard ONNX opset-23 ops (RMSNormalization,
RotaryEmbedding with explicit position_ids, Attention with grouped KV heads,
a real boolean mask and past/present KV), q/k/v and gate/up fused, ~16 nodes per layer, and keeps the
bundle contract of ``contract.py``.

Per layer, x: (B, S, hidden)::

    h = RMSNorm(x);  q, k, v = h @ Wq, h @ Wk, h @ Wv          # (B, S, H*D), (B, S, Hkv*D)
    q, k = RoPE(q, position_ids), RoPE(k, position_ids)
    y, present_k, present_v = Attention(q, k, v, mask_i, past_k, past_v)   # GQA
    # mask_i (B, 1, S, T) float: 0 / bias[:, i] where causal and attention_mask allow, -max elsewhere
    x = x + y @ Wo;  h = RMSNorm(x);  x = x + (silu(h @ Wg) * (h @ Wu)) @ Wd

What other families change in this layer (q/k norms, Gemma's sandwich norms and GeGLU,
sliding-window masks, per-layer RoPE bases) is one ``flavour.Flavour`` record.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from inducekv.core import contract
from inducekv.core.errors import UnsupportedModelError
from inducekv.export import flavour as flavours
from inducekv.export.flavour import Flavour
from inducekv.export.fuse import fuse_for_onnxruntime

OPSET = 23


def rope_cache(theta: float, head_dim: int, max_pos: int, rope_scaling: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables (max_pos, head_dim/2) for rotate-half RoPE."""
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
        raise UnsupportedModelError(
            f"rope scaling {rope_scaling!r} is not supported by the native graph yet; export with --graph optimum")
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))   # (D/2,)
    ang = np.arange(max_pos, dtype=np.float64)[:, None] * inv[None, :]                # (P, D/2)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


class _G:
    """Tiny helper that names nodes and collects initializers."""

    def __init__(self):
        self.nodes, self.inits, self._names = [], [], set()

    def init(self, name: str, arr: np.ndarray) -> str:
        """Add a constant once; a name seen before (a shared constant) is reused as it is."""
        if name not in self._names:
            self._names.add(name)
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, **attrs) -> list[str] | str:
        outs = [f"{name}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs if n_out > 1 else outs[0]


def build_llama_graph(state: dict[str, np.ndarray], cfg, share_tied: bool = True,
                      key_layers: int | None = None, embeds_input: bool = False,
                      query_outputs: bool = False, flavour: Flavour | None = None,
                      contrib: bool = True) -> onnx.ModelProto:
    """ONNX decoder from an HF Llama-layout state dict (numpy fp32) and its config.

    ``flavour``: what the architecture changes in the Llama layer (``flavour.py``: Qwen2/3,
    Gemma 3); None reads a plain Llama/Qwen2 layer from ``cfg``.

    ``key_layers``: build the *retrieval-key graph* instead: the first ``key_layers``
    layers without past KV, output ``key`` (B, hidden) = the attention-mask-weighted
    mean of the hidden states after them (see ``contract.KEY_FILE``).

    ``share_tied``: with tied embeddings, the LM head reads the embedding table
    through a Transpose node (one copy on disk). Pass False before weight
    quantization, so the head is a constant MatMul the quantizer can compress.

    ``embeds_input``: the first input is ``inputs_embeds`` (B, S, hidden) float instead of
    ``input_ids`` (multimodal bundles: the runtime looks up tokens and splices image
    features in; see ``contract.EMBED_FILE``). They enter the layers as given (no embedding scale).

    ``query_outputs``: build the *probe graph* (``contract.PROBE_FILE``): the decoder, plus
    outputs ``query.{i}`` (B, S, H*D), each layer's queries after RoPE.

    ``contrib``: take onnxruntime's fused contrib ops (``fuse.py``): skip + RMS norms, and in
    the decoder (not the probe graph) GroupQueryAttention with in-place KV. The probe graph
    keeps the standard Attention: the learn job runs padded batches of several prompts after
    a past on it, which GroupQueryAttention refuses (batch > 1 with past and S > 1). False
    keeps the standard opset-23 graph (the reference the fused one is tested against).
    """
    L, H, Hkv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    fl = flavour or flavours.llama(cfg)
    if key_layers is not None:
        L = key_layers
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    eps = float(cfg.rms_norm_eps)
    g = _G()
    rope = _rope_tables(g, fl, D, cfg.max_position_embeddings, L)
    first = contract.INPUTS_EMBEDS if embeds_input else contract.INPUT_IDS
    emb = g.init("model.embed_tokens.weight", state["model.embed_tokens.weight"])  # (V, hidden)
    layer_masks, mask_of_window = _masks(g, first, fl, L, with_bias=key_layers is None)

    x = first if embeds_input else g.op("Gather", [emb, contract.INPUT_IDS], "embed", axis=0)  # (B, S, hidden)
    if fl.embed_scale is not None and not embeds_input:
        x = g.op("Mul", [x, g.init("embed.scale", np.array(fl.embed_scale, np.float32))], "embed/scale")
    present, queries = [], []

    def linear(inp, key, name):
        w = g.init(key, state[key].T)                                               # (in, out)
        y = g.op("MatMul", [inp, w], name)
        bias = key[: -len("weight")] + "bias"
        if bias in state:
            y = g.op("Add", [y, g.init(bias, state[bias])], name + "/bias")
        return y

    def fused(inp, keys, name):
        """One MatMul over concatenated weights, then Split: fewer, larger matmuls decode faster."""
        w = np.concatenate([state[k].T for k in keys], axis=1)                     # (in, sum out)
        sizes = [state[k].shape[0] for k in keys]
        y = g.op("MatMul", [inp, g.init(f"{name}.fused.weight", w)], name)
        biases = [k[: -len("weight")] + "bias" for k in keys]
        if any(b in state for b in biases):
            bias = np.concatenate([state.get(b, np.zeros(n, np.float32)) for b, n in zip(biases, sizes)])
            y = g.op("Add", [y, g.init(f"{name}.fused.bias", bias)], name + "/bias")
        return g.op("Split", [y, g.init(f"{name}.split", np.array(sizes, np.int64))], name + "/split",
                    n_out=len(keys), axis=-1)

    def rmsnorm(inp, key, name):
        w = state[key] + np.float32(fl.norm_offset) if fl.norm_offset else state[key]   # Gemma: (1 + w)
        return g.op("RMSNormalization", [inp, g.init(key, w.astype(np.float32))], name, axis=-1, epsilon=eps)

    def head_norm(inp, key, name):
        """RMSNorm over each head's D channels: (B, S, n*D) -> (B, S, n, D) -> norm -> (B, S, n*D)."""
        heads = g.op("Reshape", [inp, g.init("const.heads_shape", np.array([0, 0, -1, D], np.int64))], name + "/split")
        normed = rmsnorm(heads, key, name)                                          # (B, S, n, D)
        return g.op("Reshape", [normed, g.init("const.flat_shape", np.array([0, 0, -1], np.int64))], name + "/merge")

    attn_kw = {"scale": fl.attn_scale} if fl.attn_scale is not None else {}
    for i in range(L):
        p = f"model.layers.{i}."
        cos, sin = rope[i]
        h = rmsnorm(x, p + "input_layernorm.weight", f"l{i}/ln1")
        q, k, v = fused(h, [p + f"self_attn.{x}_proj.weight" for x in "qkv"], f"l{i}/qkv")  # (B, S, H*D), 2x (B, S, Hkv*D)
        if fl.qk_norm:
            q = head_norm(q, p + "self_attn.q_norm.weight", f"l{i}/q_norm")
            k = head_norm(k, p + "self_attn.k_norm.weight", f"l{i}/k_norm")
        q = g.op("RotaryEmbedding", [q, cos, sin, contract.POSITION_IDS], f"l{i}/rope_q", num_heads=H)
        k = g.op("RotaryEmbedding", [k, cos, sin, contract.POSITION_IDS], f"l{i}/rope_k", num_heads=Hkv)
        if key_layers is None:
            y, pk, pv = g.op("Attention", [q, k, v, layer_masks[i], contract.past_key(i), contract.past_value(i)],
                             f"l{i}/attn", n_out=3, q_num_heads=H, kv_num_heads=Hkv, **attn_kw)  # y (B, S, H*D); pk (B, Hkv, T, D)
            present += [(pk, contract.present_key(i)), (pv, contract.present_value(i))]
            if query_outputs:
                queries.append((q, contract.query_output(i)))
        else:
            y = g.op("Attention", [q, k, v, mask_of_window[fl.windows[i]]], f"l{i}/attn", q_num_heads=H,
                     kv_num_heads=Hkv, **attn_kw)
        y = linear(y, p + "self_attn.o_proj.weight", f"l{i}/o")
        if fl.sandwich:
            y = rmsnorm(y, p + "post_attention_layernorm.weight", f"l{i}/post_attn_norm")
        x = g.op("Add", [x, y], f"l{i}/res1")
        h = rmsnorm(x, p + ("pre_feedforward_layernorm.weight" if fl.sandwich else "post_attention_layernorm.weight"),
                    f"l{i}/ln2")
        gate, up = fused(h, [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], f"l{i}/gate_up")  # (B, S, I) each
        act = g.op("Mul", [_activation(g, gate, fl.activation, f"l{i}"), up], f"l{i}/act")
        y = linear(act, p + "mlp.down_proj.weight", f"l{i}/down")
        if fl.sandwich:
            y = rmsnorm(y, p + "post_feedforward_layernorm.weight", f"l{i}/post_ff_norm")
        x = g.op("Add", [x, y], f"l{i}/res2")

    if key_layers is not None:
        return _key_model(g, x, cfg.hidden_size, embeds_input)
    h = rmsnorm(x, "model.norm.weight", "final_norm")
    # logits only for rows logits_from.. (an input with a default of 0: all rows): callers that
    # read the last row, or an answer's rows, skip the LM head of the others (~20% of a prefill)
    g.init(contract.LOGITS_FROM, np.array([0], np.int64))
    h = g.op("Slice", [h, contract.LOGITS_FROM, g.init("const.int64max", np.array([2 ** 62], np.int64)),
                       g.init("const.axis1", np.array([1], np.int64))], "lm_head/rows")      # (B, S - from, hidden)
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    tied = "lm_head.weight" not in state or head is state["model.embed_tokens.weight"]
    if tied and share_tied:
        head_w = g.op("Transpose", [emb], "lm_head/transpose", perm=[1, 0])        # (hidden, V)
    else:
        head_w = g.init("lm_head.weight", head.T)
    logits_raw = g.op("MatMul", [h, head_w], "lm_head")                              # (B, S, V)
    if fl.final_softcap is not None:
        cap = g.init("logits.softcap", np.array(fl.final_softcap, np.float32))
        logits_raw = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits_raw, cap], "logits/div")], "logits/tanh"), cap],
                          "logits/softcap")

    g.nodes.append(helper.make_node("Identity", [logits_raw], [contract.LOGITS], name="out/logits"))
    for src, dst in present + queries:
        g.nodes.append(helper.make_node("Identity", [src], [dst], name=f"out/{dst}"))

    V = head.shape[0]
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        _first_input(embeds_input, cfg.hidden_size),
        helper.make_tensor_value_info(contract.ATTENTION_MASK, i64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info(contract.POSITION_IDS, i64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info(contract.LOGITS, f32, ["batch_size", "logits_length", V])]
    for i in range(L):
        for name in (contract.past_key(i), contract.past_value(i)):
            inputs.append(helper.make_tensor_value_info(name, f32, ["batch_size", Hkv, "past_sequence_length", D]))
        for name in (contract.present_key(i), contract.present_value(i)):
            outputs.append(helper.make_tensor_value_info(name, f32, ["batch_size", Hkv, "total_sequence_length", D]))
    inputs.append(helper.make_tensor_value_info(contract.ATTENTION_BIAS, f32, ["batch_size", L, "total_sequence_length"]))
    inputs.append(helper.make_tensor_value_info(contract.LOGITS_FROM, i64, [1]))   # has a default: optional
    for _, name in queries:
        outputs.append(helper.make_tensor_value_info(name, f32, ["batch_size", "sequence_length", H * D]))
    used = {n for node in g.nodes for n in node.input}
    graph = helper.make_graph(g.nodes, "inducekv-decoder", inputs, outputs, [t for t in g.inits if t.name in used])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="inducekv")
    model.ir_version = 10
    return fuse_for_onnxruntime(model, attention=not query_outputs) if contrib else model


def _activation(g: _G, gate: str, kind: str, name: str) -> str:
    if kind == "silu":
        return g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{name}/sig")], f"{name}/silu")
    if kind == "gelu_tanh":
        return g.op("Gelu", [gate], f"{name}/gelu", approximate="tanh")
    raise UnsupportedModelError(f"MLP activation {kind!r} is not one of {', '.join(flavours.ACTIVATIONS)}")


def _rope_tables(g: _G, fl: Flavour, D: int, max_pos: int, L: int) -> list[tuple[str, str]]:
    """(cos, sin) initializer names per layer; one pair per distinct RoPE base."""
    names: dict[float, tuple[str, str]] = {}
    for theta in fl.thetas[:L]:
        if theta not in names:
            cos, sin = rope_cache(theta, D, max_pos, None)
            suffix = "" if not names else f".{len(names)}"
            names[theta] = (g.init(f"rope.cos{suffix}", cos), g.init(f"rope.sin{suffix}", sin))
    return [names[t] for t in fl.thetas[:L]]


def _masks(g: _G, first: str, fl: Flavour, L: int, with_bias: bool) -> tuple[list[str], dict]:
    """Per-layer attention masks, built once and shared by the layers of one window.

    Returns (decoder masks per layer, {window: bool mask}). Bool masks are (B, 1, S, T),
    True = attend: the query at slot q sees slot k when ``attention_mask[k]`` is 1, ``k <= q``
    and, on a windowed layer, ``q - k < W``. With ``with_bias`` the decoder's masks are
    float (B, 1, S, T): ``attention_bias[:, i]`` where allowed, -max elsewhere."""
    ids_shape = g.op("Shape", [first], "mask/ids_shape")
    mask_shape = g.op("Shape", [contract.ATTENTION_MASK], "mask/shape")
    one = g.init("const.one", np.array([1], np.int64))
    zero_s = g.init("const.zero_scalar", np.array(0, np.int64))
    one_s = g.init("const.one_scalar", np.array(1, np.int64))
    S = g.op("Squeeze", [g.op("Slice", [ids_shape, one, g.init("const.two", np.array([2], np.int64))], "mask/S1")], "mask/S")
    T = g.op("Squeeze", [g.op("Slice", [mask_shape, one, "const.two"], "mask/T1")], "mask/T")
    P = g.op("Sub", [T, S], "mask/P")
    kidx = g.op("Range", [zero_s, T, one_s], "mask/kidx")                          # (T,)
    qidx = g.op("Range", [P, T, one_s], "mask/qidx")                                # (S,)
    qcol = g.op("Unsqueeze", [qidx, g.init("const.axis1", np.array([1], np.int64))], "mask/qcol")  # (S, 1)
    causal = g.op("LessOrEqual", [kidx, qcol], "mask/causal")                       # (S, T)
    keep = g.op("Cast", [contract.ATTENTION_MASK], "mask/keep", to=TensorProto.BOOL)  # (B, T)
    keep4 = g.op("Unsqueeze", [keep, g.init("const.axes12", np.array([1, 2], np.int64))], "mask/keep4")  # (B,1,1,T)
    mask = g.op("And", [keep4, causal], "mask/bool")                                # (B, 1, S, T)
    by_window = {None: mask}
    if fl.windowed:
        dist = g.op("Sub", [qcol, kidx], "mask/dist")                               # (S, T) q - k
        for w in sorted({w for w in fl.windows[:L] if w is not None}):
            near = g.op("Less", [dist, g.init(f"const.window{w}", np.array(w, np.int64))], f"mask/near{w}")  # (S, T)
            by_window[w] = g.op("And", [mask, near], f"mask/bool_w{w}")            # (B, 1, S, T)
    if not with_bias:
        return [by_window[w] for w in fl.windows[:L]], by_window
    # the decoder adds attention_bias (B, L, T) to the scores, per layer
    bias4 = g.op("Unsqueeze", [contract.ATTENTION_BIAS, g.init("const.axis2", np.array([2], np.int64))],
                 "mask/bias4")                                                       # (B, L, 1, T)
    neg = g.init("const.neg", np.array(np.finfo(np.float32).min, np.float32))
    split_of = {}
    for w in {w for w in fl.windows[:L]}:
        tag = "" if w is None else f"_w{w}"
        fmask = g.op("Where", [by_window[w], bias4, neg], f"mask/float{tag}")       # (B, L, S, T)
        split = g.op("Split", [fmask], f"mask/split{tag}", n_out=L, axis=1, num_outputs=L)  # L x (B, 1, S, T)
        split_of[w] = split if L > 1 else [split]
    return [split_of[w][i] for i, w in enumerate(fl.windows[:L])], by_window


def _first_input(embeds_input: bool, hidden: int):
    if embeds_input:
        return helper.make_tensor_value_info(contract.INPUTS_EMBEDS, TensorProto.FLOAT,
                                             ["batch_size", "sequence_length", hidden])
    return helper.make_tensor_value_info(contract.INPUT_IDS, TensorProto.INT64, ["batch_size", "sequence_length"])


def _key_model(g: _G, x: str, hidden: int, embeds_input: bool = False) -> onnx.ModelProto:
    """Finish the key graph: masked mean of ``x`` (B, S, hidden) over S -> ``key`` (B, hidden)."""
    m = g.op("Cast", [contract.ATTENTION_MASK], "key/maskf", to=TensorProto.FLOAT)           # (B, S)
    m3 = g.op("Unsqueeze", [m, g.init("key.axis2", np.array([2], np.int64))], "key/mask3")   # (B, S, 1)
    axis1 = g.init("key.axis1", np.array([1], np.int64))
    num = g.op("ReduceSum", [g.op("Mul", [x, m3], "key/masked"), axis1], "key/sum", keepdims=0)  # (B, hidden)
    den = g.op("ReduceSum", [m3, axis1], "key/count", keepdims=0)                             # (B, 1)
    g.nodes.append(helper.make_node("Div", [num, den], [contract.KEY_OUTPUT], name="out/key"))
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        _first_input(embeds_input, hidden),
        helper.make_tensor_value_info(contract.ATTENTION_MASK, i64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(contract.POSITION_IDS, i64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info(contract.KEY_OUTPUT, f32, ["batch_size", hidden])]
    used = {n for node in g.nodes for n in node.input}
    graph = helper.make_graph(g.nodes, "inducekv-key", inputs, outputs, [t for t in g.inits if t.name in used])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="inducekv")
    model.ir_version = 10
    return model
