"""The continual benchmark's LoRA baseline: byte matching and the shared-prefix training pass."""
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "continual"))
import lora  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval().requires_grad_(False)


@pytest.mark.parametrize("cap", [4096, 50_000, 1 << 20])
def test_rank_fills_the_cap_without_exceeding_it(tiny, cap):
    per_rank = lora.bytes_per_rank(tiny)
    # 2 layers x (q 32+32, k 32+16, v 32+16, o 32+32, gate/up 32+64, down 64+32) fp16
    assert per_rank == 2 * 2 * (64 + 48 + 48 + 64 + 3 * 96)
    model, rank, nbytes = lora.attach(tiny, cap)
    assert rank == cap // per_rank and nbytes == rank * per_rank <= cap < (rank + 1) * per_rank
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_cap_below_rank_one_is_refused(tiny):
    with pytest.raises(SystemExit, match="smaller than a rank-1"):
        lora.attach(tiny, 100)


def test_shared_prefix():
    rows = [([1, 2, 3, 4, 9], 4), ([1, 2, 3, 5, 9], 4), ([1, 2, 3, 4, 8, 9], 5)]
    assert lora.shared_prefix(rows, None) == 3
    assert lora.shared_prefix(rows, image_token_id=3) == 2          # stops before an image token
    assert lora.shared_prefix([([7, 8], 1), ([6, 8], 1)], None) == 1  # never empty


def test_prefix_pass_matches_full_pass_values_and_gradients(tiny):
    """Training over a shared prefix's K/V gives the full sequence's hidden states and the
    same LoRA gradients (the prefix is computed once, repeated over the batch)."""
    model, _, _ = lora.attach(tiny, 50_000, seed=1)
    for n, p in model.named_parameters():
        if "lora_B" in n:                       # B starts at zero: make the adapter matter
            torch.nn.init.normal_(p, std=0.1)
    lm = model.base_model.model
    table = lm.get_input_embeddings().weight
    P, rows = 5, [list(range(3, 15)), list(range(3, 8)) + [40, 41, 42, 43]]
    T = max(len(r) for r in rows)

    def grads():
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    # full pass, one row at a time
    model.zero_grad()
    full_h = []
    for r in rows:
        h = lm.model(inputs_embeds=table[torch.tensor(r)][None]).last_hidden_state[0, P:]
        h.pow(2).sum().backward()
        full_h.append(h.detach())
    g_full = grads()
    # shared prefix, batched with right padding
    model.zero_grad()
    x = torch.zeros(len(rows), T - P, table.shape[1])
    mask = torch.zeros(len(rows), T - P, dtype=torch.long)
    for b, r in enumerate(rows):
        x[b, :len(r) - P] = table[torch.tensor(r[P:])]
        mask[b, :len(r) - P] = 1
    h = lora.hidden_after_prefix(lm, table[torch.tensor(rows[0][:P])][None], x, mask)
    (h.pow(2) * mask[..., None]).sum().backward()
    for b, r in enumerate(rows):
        torch.testing.assert_close(h[b, :len(r) - P].detach(), full_h[b], atol=1e-5, rtol=1e-4)
    for a, b in zip(grads(), g_full):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


# --- replay and experts (lora_plus.py) ---
import numpy as np  # noqa: E402

import lora_plus  # noqa: E402


def test_expert_ranks_stay_within_the_budget():
    assert lora_plus.expert_ranks([], 6) == [6]
    assert lora_plus.expert_ranks([6], 6) == [3, 3]
    assert lora_plus.expert_ranks([3, 3], 6) == [2, 2, 2]
    assert lora_plus.expert_ranks([2, 2, 2], 6) == [1, 1, 1, 3]    # the newest takes what is left
    assert lora_plus.expert_ranks([1, 1, 1], 3) is None            # no room: the task joins an expert
    rng = np.random.default_rng(0)
    for _ in range(200):
        ranks, budget = [], int(rng.integers(1, 40))
        while (plan := lora_plus.expert_ranks(ranks, budget)) is not None:
            assert sum(plan) == budget and min(plan) >= 1
            assert all(new <= old for new, old in zip(plan, ranks))  # old experts are only ever cut
            ranks = plan
        assert len(ranks) == budget


def test_replay_buffer_never_exceeds_its_bytes():
    rng = np.random.default_rng(0)
    items, cap = [], 1000
    for n in rng.integers(1, 300, 200):
        before = sum(items) + int(n)
        items.append(int(n))
        lora_plus.keep_under(items, cap, lambda x: x, rng)
        assert sum(items) <= cap
        assert sum(items) == before or sum(items) > cap - 300    # evicts only until it fits


def test_truncated_expert_is_the_best_low_rank_update(tiny):
    """Cutting an expert keeps the top singular directions of its update (Eckart-Young), per module,
    under the same name, and leaves the other experts alone."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    ex = lora_plus.ExpertLoRA.__new__(lora_plus.ExpertLoRA)     # no runtime needed for the cut
    ex.ranks = {"task0": 4, "task1": 2}
    torch.manual_seed(0)
    ex.model = get_peft_model(copy_model(tiny), ex._config(4), adapter_name="task0")
    ex.model.add_adapter("task1", ex._config(2))
    for n, p in ex.model.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.2)
    mods = [m for m in ex.model.modules() if isinstance(m, LoraLayer)]
    before = [m.scaling["task0"] * (m.lora_B["task0"].weight @ m.lora_A["task0"].weight) for m in mods]
    other = [m.lora_A["task1"].weight.clone() for m in mods]
    ex._truncate("task0", 2)
    assert ex.ranks == {"task0": 2, "task1": 2}
    for m, dw, a1 in zip(mods, before, other):
        assert m.lora_A["task0"].weight.shape[0] == 2
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        after = m.scaling["task0"] * (m.lora_B["task0"].weight @ m.lora_A["task0"].weight)
        torch.testing.assert_close(after, best, atol=1e-5, rtol=1e-4)
        assert torch.equal(m.lora_A["task1"].weight, a1)


def copy_model(m):
    import copy

    return copy.deepcopy(m)
