"""The plain chat prompt's cached start (``runtime.prefix``): same answer, fewer tokens prefilled."""
import numpy as np

from inducekv.runtime.api import Runtime


def _logits(rt, prep):
    logits, _ = rt.decoder.forward(prep.ids, prep.cache, positions=np.arange(prep.pos, prep.pos + len(prep.ids)),
                                   logits_from=len(prep.ids) - 1)
    return logits[-1]


def test_cached_start_gives_the_whole_prompts_logits(device_bundle):
    rt = Runtime.open(device_bundle)
    for system in (None, "You answer in one word."):
        for prompt in ("What is the capital of Dikrodor?", "a", "Zz  \n two lines\nhere"):
            rt.cache_prefix = False
            whole = rt.prepare(prompt, system=system, use_memory=False)
            rt.cache_prefix = True
            cut = rt.prepare(prompt, system=system, use_memory=False)
            assert whole.pos == 0 and whole.cache.length == 0
            assert cut.pos == cut.cache.length > 0                     # the start came from the cache
            assert whole.ids == rt.plain_prefix._cached[system or ""][0] + cut.ids
            np.testing.assert_allclose(_logits(rt, cut), _logits(rt, whole), atol=2e-4)
            a = rt.generate(prompt, system=system, use_memory=False, max_new_tokens=6)
            rt.cache_prefix = False
            b = rt.generate(prompt, system=system, use_memory=False, max_new_tokens=6)
            assert a.token_ids == b.token_ids
            assert a.timings.prompt_tokens == b.timings.prompt_tokens - cut.pos


def test_a_prompt_that_does_not_start_with_the_cached_tokens_is_prefilled_whole(device_bundle):
    rt = Runtime.open(device_bundle)
    pre, _ = rt.plain_prefix._get(None)
    other = [t for t in range(5) if t != pre[0]][:1] + pre[1:] + [7, 8]
    assert rt.plain_prefix.split(other, None) is None
    assert rt.plain_prefix.split(list(pre), None) is None          # nothing of its own to prefill
    ids, cache, pos = rt.plain_prefix.split(pre + [7, 8], None)
    assert ids == [7, 8] and pos == len(pre) == cache.length
