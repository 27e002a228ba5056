"""The key/value cache: any chunking of the prompt plus decoding equals one full forward."""
import json

import pytest
import torch
from hypothesis import given, strategies as st

from helpers import run_script, tiny_gpt
from nanococa.common import parse_scaling
from nanococa.model import ATTENTIONS, KVCache


@pytest.mark.parametrize("attn_scale", ["none", "ssmax"])
@pytest.mark.parametrize("variant", ATTENTIONS)
@given(prompt_len=st.integers(1, 70), chunk=st.integers(1, 32), steps=st.integers(0, 12),
       scaling=st.sampled_from(["none", "dynamic:4", "linear:2", "logn", "dynamic:4+logn", "yarn:4",
                                "yarn:dynamic", "yarn:dynamic+logn"]), seed=st.integers(0, 1000))
def test_cached_generation_equals_one_full_forward(variant, attn_scale, prompt_len, chunk, steps, scaling,
                                                   seed):
    model = tiny_gpt(variant, dtype=torch.float64, block_size=16,
                     attn_scale=attn_scale)  # NTK and logn act past 16
    scaling = parse_scaling(scaling)
    g = torch.Generator().manual_seed(seed)
    total = prompt_len + steps
    idx = torch.randint(0, 61, (2, total), generator=g)
    full = model(idx, scaling=scaling)[0]  # dynamic NTK sized for the whole sequence
    cache = KVCache(model.config, 2, total, dtype=torch.float64, scaling=scaling)
    pieces = [model(idx[:, s:min(s + chunk, prompt_len)],
                    cache=cache)[0] for s in range(0, prompt_len, chunk)]
    pieces += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(prompt_len, total)]  # token by token
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", ATTENTIONS)
def test_greedy_decoding_with_and_without_cache_agree(variant):
    model = tiny_gpt(variant, seed=3)
    prompt = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    cached = model.generate(prompt, 40, temperature=0, prefill_chunk=4)
    idx = prompt
    for _ in range(40):  # no cache: the whole sequence through the model for every token
        idx = torch.cat((idx, model(idx)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(cached, idx)


def test_cache_owns_its_position():
    model = tiny_gpt()
    cache = KVCache(model.config, 1, 8)
    assert cache.pos == 0
    model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    assert cache.pos == 7
    start, (cos, sin) = cache.next_positions(1)
    assert start == 7 and cos.shape == (1, 8)


def test_cache_refuses_to_overflow():
    model = tiny_gpt()
    cache = KVCache(model.config, 1, 8)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="cache holds 8"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_cache_needs_the_fast_path():
    model = tiny_gpt(attn_impl="naive")
    with pytest.raises(ValueError, match="attn_impl='fast'"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=KVCache(model.config, 1, 8))


PROBE_32K = """
import json, resource, sys, time, torch
from nanococa.model import GPT, GPTConfig, Scaling
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=257, block_size=512, n_layer=2, n_head=4, n_embd=128,
                      attention=sys.argv[1])).eval()
prompt = torch.randint(0, 257, (1, 32768))
t0 = time.perf_counter()
out = model.generate(prompt, 16, temperature=0, scaling=Scaling("dynamic", 4.0))
dt = time.perf_counter() - t0
print(json.dumps(dict(shape=list(out.shape), seconds=dt,
                      peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["coca", "alibi"])
def test_32k_prompt_prefills_and_generates_below_one_TxT_matrix(variant):
    out = run_script("-c", PROBE_32K, variant, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["shape"] == [1, 32768 + 16]
    assert r["peak_rss"] < 32768 * 32768 * 4, f"peak resident memory {r['peak_rss'] / 2**30:.2f} GiB"
