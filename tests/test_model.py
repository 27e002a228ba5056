"""Whole-model properties: config checks, causality, naive == fast for the GPT, the naive budget, memory."""
import json

import pytest
import torch
from hypothesis import given, strategies as st

from helpers import run_script, tiny_gpt
from nanococa.model import ATTENTIONS, GPTConfig, attention, parse_scaling, rotary_cos_sin


@pytest.mark.parametrize("kw, words", [
    (dict(attention="alibi"), ["alibi", "coca-slack"]),
    (dict(attn_impl="flash"), ["flash", "naive"]),
    (dict(n_embd=30, n_head=2), ["odd", "15"]),
    (dict(n_embd=30, n_head=4), ["divisible"]),
    (dict(dropout=1.5), ["dropout"]),
    (dict(n_layer=0), ["n_layer"]),
])
def test_bad_config_is_refused_by_name(kw, words):
    with pytest.raises(ValueError) as e:
        GPTConfig(**kw)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("bad", ["ntk:4", "dynamic:x", "linear:0.5", ("yarn", 2.0)])
def test_bad_rope_scaling_is_refused(bad):
    with pytest.raises(ValueError, match="rope scaling"):
        parse_scaling(bad)


def test_parse_scaling_forms():
    assert parse_scaling(None) is None and parse_scaling("none") is None
    assert parse_scaling("dynamic:4") == ("dynamic", 4.0) == parse_scaling(("dynamic", 4))
    assert parse_scaling("linear:8") == ("linear", 8.0)


def test_dynamic_ntk_changes_nothing_within_the_training_length():
    a = rotary_cos_sin(0, 64, 16, scaling="dynamic:4", train_len=64, dtype=torch.float64)
    b = rotary_cos_sin(0, 64, 16, dtype=torch.float64)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = rotary_cos_sin(0, 65, 16, scaling="dynamic:4", train_len=64, dtype=torch.float64)
    assert not torch.allclose(c[0][:64], b[0])


def test_linear_scaling_divides_positions():
    a = rotary_cos_sin(0, 40, 16, scaling="linear:4", dtype=torch.float64)
    b = rotary_cos_sin(0, 10, 16, dtype=torch.float64)
    torch.testing.assert_close(a[0][::4], b[0])


@pytest.mark.parametrize("variant", ATTENTIONS)
@given(T=st.integers(2, 40), i=st.data(), seed=st.integers(0, 1000))
def test_gpt_is_causal(variant, T, i, seed):
    i = i.draw(st.integers(0, T - 2))
    model = tiny_gpt(variant, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 61, (2, T), generator=g)
    changed = idx.clone()
    changed[:, i + 1:] = torch.randint(0, 61, (2, T - i - 1), generator=g)
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :i + 1], b[:, :i + 1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", ATTENTIONS)
@given(T=st.integers(1, 48), seed=st.integers(0, 1000), offset=st.integers(0, 5000))
def test_gpt_naive_equals_fast_loss_and_gradients(variant, T, seed, offset):
    g = torch.Generator().manual_seed(seed)
    idx, targets = torch.randint(0, 61, (2, T), generator=g), torch.randint(0, 61, (2, T), generator=g)
    results = []
    for impl in ("naive", "fast"):
        model = tiny_gpt(variant, impl, seed=seed, dtype=torch.float64)
        _, loss = model(idx, targets, pos_offset=offset)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-10)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("variant", ATTENTIONS)
def test_naive_path_refuses_beyond_its_budget(variant):
    q = torch.zeros(1, 1, 1, 1, 64).expand(64, 16, 1, 1024, 64)[:, :, 0]  # (64, 16, 1024, 64), no memory
    rot = rotary_cos_sin(0, 1024, 64)
    with pytest.raises(RuntimeError, match="attn_impl='fast'"):
        attention(variant, "naive", q, q, q, rot, rot)


def test_loss_without_targets_is_none_and_logits_cover_every_position():
    model = tiny_gpt()
    logits, loss = model(torch.zeros(3, 7, dtype=torch.long))
    assert loss is None and logits.shape == (3, 7, 61)


MEMORY_PROBE = """
import json, resource, sys, torch
from nanococa.model import GPT, GPTConfig
torch.manual_seed(0)
T = 4096
model = GPT(GPTConfig(vocab_size=256, block_size=512, n_layer=2, n_head=4, n_embd=256, attention=sys.argv[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
idx = torch.randint(0, 256, (1, T))
_, loss = model(idx, idx)
loss.backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(before_kib=before, after_kib=after, loss=loss.item())))
"""


@pytest.mark.parametrize("variant", ["coca", "coca-slack"])
def test_fast_path_trains_at_4096_without_a_TxTxD_tensor(variant):
    """Forward and backward at T = 4096 (2 layers, D = 64) in a fresh process; its peak resident memory
    must stay below one T x T x D float32 tensor (4 GiB), which the literal strict path would need."""
    out = run_script("-c", MEMORY_PROBE, variant)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    peak = r["after_kib"] * 1024
    assert torch.isfinite(torch.tensor(r["loss"]))
    assert peak < 4096 * 4096 * 64 * 4, f"peak resident memory {peak / 2**30:.2f} GiB"
