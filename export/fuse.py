"""onnxruntime's fused contrib ops (domain ``com.microsoft``) in the native decoder graph.

Two rewrites of a built graph, node for node, each computing what it replaces::

    s = Add(x, y);  h = RMSNormalization(s, w)
        =>  h, _, _, s = SkipSimplifiedLayerNormalization(x, y, w)
    q0, k0, v = Split(qkv);  q = RotaryEmbedding(q0, cos, sin, position_ids);  k = RotaryEmbedding(k0, ...)
    y, present_k, present_v = Attention(q, k, v, mask_i, past_k, past_v)
        =>  y, present_k, present_v = GroupQueryAttention(qkv, -, -, past_k, past_v, seqlens_k, total,
                                          cos, sin, position_ids, attention_bias=mask_i,
                                          causal=0, do_rotary=1)

Fewer nodes make a decode step cheaper (at 135M parameters onnxruntime's time between
nodes is a visible share of it), and ``GroupQueryAttention`` can append a step's K/V to the
past **in place**: when ``present.{i}`` is bound to the same buffer as ``past_key_values.{i}``
(B, Hkv, capacity, D), it writes the new slots at ``seqlens_k + 1 - S`` and attends over
``[0, total)``; the standard ``Attention`` op concatenates past and new into a fresh present
every step (README "Decode speed").

What a query sees is still decided by the graph's own mask alone: the op's causal mask is
off (``causal=0``) and ``mask_i`` (B, 1, S, T) carries ``attention_mask``, causality, sliding
windows and the per-layer ``attention_bias``. RoPE keeps its explicit positions: the op rotates
q and k itself (``do_rotary``) with the layer's own cos/sin tables and the graph's
``position_ids`` (B, S), the same kernel as ``RotaryEmbedding`` (logits bit-identical), and
takes q/k/v packed when they are the three parts of one Split (4-6% faster decode steps
than with the two ``RotaryEmbedding`` and the Split kept, README "Decode speed"). A layer
whose rotation the op cannot take (partial or interleaved rotary) keeps its nodes. One
difference: with an empty past the op rotates by ``position_ids[:, 0] + arange(S)`` (row 0's
first position, for every row), so such a graph says ``contract.ROTARY_KEY`` = ``"attention"``
and the runtime gives prompts with other positions a hidden past slot (``Decoder._run``).
``seqlens_k`` is ``T - 1`` for every row: each row holds T = P + S slots, padding included
(masked by the bias), as before.

A rewritten graph says so in its metadata (``KV_BUFFER_KEY`` = ``"shared"``); the runtime's
in-place decode loop (``runtime/session.py`` ``InPlaceSteps``) runs only on such graphs.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

import numpy as np

from inducekv.core import contract

DOMAIN = "com.microsoft"
KV_BUFFER_KEY = contract.KV_BUFFER_KEY
_ATTENTION_ATTRS = {"q_num_heads", "kv_num_heads", "scale"}


def fuse_for_onnxruntime(model: onnx.ModelProto, attention: bool = True) -> onnx.ModelProto:
    """Rewrite ``model`` in place (skip + RMS norms; with ``attention``, past/present
    ``Attention`` nodes) and return it."""
    g = model.graph
    nodes = _fuse_skip_norms(list(g.node))
    if attention:
        nodes, n_attn = _fuse_attention(g, nodes)
        if n_attn:
            model.metadata_props.append(onnx.StringStringEntryProto(key=KV_BUFFER_KEY, value="shared"))
        if any(a.name == "do_rotary" for n in nodes if n.op_type == "GroupQueryAttention" for a in n.attribute):
            model.metadata_props.append(onnx.StringStringEntryProto(key=contract.ROTARY_KEY, value="attention"))
    del g.node[:]
    g.node.extend(nodes)
    if nodes and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model


def _fuse_skip_norms(nodes: list) -> list:
    """Each RMSNormalization (last axis) of an Add's output becomes one
    SkipSimplifiedLayerNormalization at the Add's place; its 4th output is the sum."""
    producer = {o: n for n in nodes for o in n.output}
    fused_adds = {}
    for n in nodes:
        add = producer.get(n.input[0]) if n.op_type == "RMSNormalization" else None
        if add is None or add.op_type != "Add" or add.name in fused_adds:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if attrs.get("axis", -1) != -1 or attrs.get("stash_type", 1) != 1:
            continue
        fused_adds[add.name] = (n.name, helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], n.input[1]],
            [n.output[0], "", "", add.output[0]], name=n.name + "/skip", domain=DOMAIN,
            epsilon=float(attrs.get("epsilon", 1e-5))))
    dropped = {norm for norm, _ in fused_adds.values()}
    out = []
    for n in nodes:
        if n.name in fused_adds:
            out.append(fused_adds[n.name][1])
        elif n.name not in dropped:
            out.append(n)
    return out


def _fuse_attention(g: onnx.GraphProto, nodes: list) -> tuple[list, int]:
    """Attention nodes with past/present become GroupQueryAttention; returns (nodes, count)."""
    todo = [n for n in nodes if n.op_type == "Attention" and len(n.input) == 6 and len(n.output) >= 3]
    if not todo:
        return nodes, 0
    for n in todo:
        extra = {a.name for a in n.attribute} - _ATTENTION_ATTRS
        if extra:
            raise ValueError(f"attention node {n.name} has attributes {sorted(extra)} the fused op does not carry")
    # seqlens_k (B,) int32 = T - 1 and total (scalar int32) = T, from attention_mask (B, T)
    for name, v in (("gqa.c0", 0), ("gqa.c1", 1), ("gqa.c2", 2)):
        g.initializer.append(numpy_helper.from_array(np.array([v], np.int64), name))
    pre = [
        helper.make_node("Shape", [contract.ATTENTION_MASK], ["gqa/mshape"], name="gqa/mshape"),
        helper.make_node("Slice", ["gqa/mshape", "gqa.c0", "gqa.c1"], ["gqa/B"], name="gqa/B"),      # (1,)
        helper.make_node("Slice", ["gqa/mshape", "gqa.c1", "gqa.c2"], ["gqa/T"], name="gqa/T"),      # (1,)
        helper.make_node("Sub", ["gqa/T", "gqa.c1"], ["gqa/Tm1"], name="gqa/Tm1"),
        helper.make_node("Cast", ["gqa/Tm1"], ["gqa/Tm1_i32"], name="gqa/Tm1_i32", to=TensorProto.INT32),
        helper.make_node("Expand", ["gqa/Tm1_i32", "gqa/B"], ["gqa/seqlens_k"], name="gqa/seqlens_k"),  # (B,)
        helper.make_node("Squeeze", ["gqa/T"], ["gqa/T0"], name="gqa/T0"),
        helper.make_node("Cast", ["gqa/T0"], ["gqa/total"], name="gqa/total", to=TensorProto.INT32),  # ()
    ]
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, int] = {o.name: 1 for o in g.output}
    for n in nodes:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    names = {n.name for n in todo}
    dropped: set[str] = set()
    out = []
    for n in nodes:
        if n.name in names:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            kw = {"scale": float(attrs["scale"])} if "scale" in attrs else {}
            q, k, v, mask, past_k, past_v = n.input
            rope = _rope_pair(producer, consumers, q, k)
            if rope is not None:
                (rq, rk), kw["do_rotary"] = rope, 1
                q, k, rotary = rq.input[0], rk.input[0], list(rq.input[1:4])
                dropped |= {rq.name, rk.name}
                split = _qkv_split(producer, consumers, q, k, v)
                if split is not None:
                    q, k, v = split.input[0], "", ""
                    dropped.add(split.name)
            else:
                rotary = ["", "", ""]
            n = helper.make_node(
                "GroupQueryAttention", [q, k, v, past_k, past_v, "gqa/seqlens_k", "gqa/total", *rotary, mask],
                list(n.output[:3]), name=n.name + "/gqa", domain=DOMAIN, num_heads=int(attrs["q_num_heads"]),
                kv_num_heads=int(attrs["kv_num_heads"]), causal=0, **kw)
        out.append(n)
    return pre + [n for n in out if n.name not in dropped], len(todo)


def _rope_pair(producer: dict, consumers: dict, q: str, k: str):
    """The two RotaryEmbedding nodes making ``q`` and ``k`` when the fused op can do their work:
    the same cos/sin tables and positions, full and non-interleaved rotation, and no other
    reader of their outputs (the probe graph reads each layer's rotated q). Else None."""
    rq, rk = producer.get(q), producer.get(k)
    if rq is None or rk is None or rq.op_type != "RotaryEmbedding" or rk.op_type != "RotaryEmbedding":
        return None
    if len(rq.input) != 4 or list(rq.input[1:]) != list(rk.input[1:]) or consumers.get(q) != 1 or consumers.get(k) != 1:
        return None
    for node in (rq, rk):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("interleaved", 0) or attrs.get("rotary_embedding_dim", 0):
            return None
    return rq, rk


def _qkv_split(producer: dict, consumers: dict, q: str, k: str, v: str):
    """The Split whose three outputs are exactly q, k, v (in order) and read by nothing else."""
    sp = producer.get(q)
    if sp is None or sp.op_type != "Split" or list(sp.output) != [q, k, v]:
        return None
    if any(consumers.get(x) != 1 for x in (q, k, v)):
        return None
    return sp
