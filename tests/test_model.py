"""Whole-model properties: config checks, causality, naive == fast for the GPT, the naive budget, memory."""
import json
import math

import pytest
import torch
from hypothesis import given, strategies as st

from helpers import run_script, tiny_gpt
from nanococa.common import parse_scaling
from nanococa.model import ATTENTIONS, GPTConfig, KVCache, Scaling, attention, rotary_cos_sin


@pytest.mark.parametrize("kw, words", [
    (dict(attention="xpos"), ["xpos", "coca-slack", "alibi"]),
    (dict(attn_scale="logn"), ["attn_scale", "ssmax"]),
    (dict(rope_base=float("inf")), ["rope_base", "finite"]),
    (dict(rope_base=float("nan")), ["rope_base"]),
    (dict(dropout=float("nan")), ["dropout"]),
    (dict(bias="yes"), ["bias"]),
    (dict(n_layer=2.0), ["n_layer"]),
    (dict(attn_impl="flash"), ["flash", "naive"]),
    (dict(n_embd=30, n_head=2), ["odd", "15", "coca"]),
    (dict(n_embd=30, n_head=4), ["divisible"]),
    (dict(dropout=1.5), ["dropout"]),
    (dict(n_layer=0), ["n_layer"]),
])
def test_bad_config_is_refused_by_name(kw, words):
    with pytest.raises(ValueError) as e:
        GPTConfig(**kw)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("bad, words", [
    ("ntk:4", ["ntk:4", "logn"]), ("dynamic:x", ["not a number"]), ("linear:0.5", ["at least 1"]),
    ("yarn", ["yarn"]), ("yarn:static", ["not a number"]), ("yarn:0.5", ["at least 1"]),
    ("yarn:4+dynamic:2", ["rope scaling"]), ("dynamic:inf", ["finite"]), ("dynamic:nan", ["finite"]),
    ("dynamic:4+dynamic:2", ["dynamic"]), ("dynamic:4+linear:2", ["rope scaling"]), ("logn+logn", ["logn"]),
    ("logn:2", ["logn:2"]), ("", ["''"]), ("dynamic", ["dynamic"]),
])
def test_bad_scaling_is_refused_by_name(bad, words):
    with pytest.raises(ValueError) as e:
        parse_scaling(bad)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_parse_scaling_forms():
    assert parse_scaling("none") == Scaling()
    assert parse_scaling("dynamic:4") == Scaling("dynamic", 4.0) == parse_scaling("dynamic:4.0")
    assert parse_scaling("linear:8") == Scaling("linear", 8.0)
    assert parse_scaling("dynamic:4+logn") == Scaling("dynamic", 4.0, True)
    assert parse_scaling(" logn + dynamic:4 ") == Scaling("dynamic", 4.0, True)
    assert parse_scaling("logn") == Scaling(logn=True) == parse_scaling("none+logn")
    assert parse_scaling("yarn:16") == Scaling("yarn", 16.0)
    assert parse_scaling("yarn:dynamic+logn") == Scaling("yarn-dynamic", 1.0, True)


def test_the_model_refuses_a_scaling_given_as_text():
    with pytest.raises(TypeError, match="parse_scaling"):
        tiny_gpt()(torch.zeros(1, 3, dtype=torch.long), scaling="dynamic:4")


@pytest.mark.parametrize("variant", ATTENTIONS)
def test_logn_changes_nothing_within_the_training_length_and_something_beyond(variant):
    model = tiny_gpt(variant, dtype=torch.float64, block_size=16)
    idx = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(0))
    plain, logn = model(idx)[0], model(idx, scaling=parse_scaling("logn"))[0]
    assert torch.equal(plain[:, :16], logn[:, :16])
    assert not torch.allclose(plain[:, 17:], logn[:, 17:])


def test_dynamic_ntk_changes_nothing_within_the_training_length():
    a = rotary_cos_sin(0, 64, 16, scaling=parse_scaling("dynamic:4"), train_len=64, dtype=torch.float64)
    b = rotary_cos_sin(0, 64, 16, dtype=torch.float64)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = rotary_cos_sin(0, 65, 16, scaling=parse_scaling("dynamic:4"), train_len=64, dtype=torch.float64)
    assert not torch.allclose(c[0][:64], b[0])


def test_linear_scaling_divides_positions():
    a = rotary_cos_sin(0, 40, 16, scaling=parse_scaling("linear:4"), dtype=torch.float64)
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


@pytest.mark.parametrize("attn_scale", ["none", "ssmax"])
@pytest.mark.parametrize("variant", ATTENTIONS)
@given(T=st.integers(1, 48), seed=st.integers(0, 1000), offset=st.integers(0, 5000),
       scaling=st.sampled_from(["none", "logn", "dynamic:4+logn", "yarn:dynamic+logn"]))
def test_gpt_naive_equals_fast_loss_and_gradients(variant, attn_scale, T, seed, offset, scaling):
    g = torch.Generator().manual_seed(seed)
    idx, targets = torch.randint(0, 61, (2, T), generator=g), torch.randint(0, 61, (2, T), generator=g)
    results = []
    for impl in ("naive", "fast"):
        model = tiny_gpt(variant, impl, seed=seed, dtype=torch.float64, attn_scale=attn_scale, block_size=16)
        _, loss = model(idx, targets, pos_offset=offset, scaling=parse_scaling(scaling))
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
        attention(variant, "naive", q, q, q, rot=rot, slopes=torch.ones(16))


@pytest.mark.parametrize("variant", ["coca", "rope", "phase-free", "coca-signed"])
@given(T=st.integers(1, 40), shift=st.integers(1, 100_000), seed=st.integers(0, 1000))
def test_gpt_output_is_invariant_to_shifting_every_position(variant, T, shift, seed):
    """Strict CoCA and RoPE depend on m - n only (Slack does not: test_attention.py shows it). ALiBi is left
    out: it takes no absolute position at all (its bias is built from m - n inside the attention call), so
    there is nothing to shift; test_attention.py checks that bias for queries after cached keys instead."""
    model = tiny_gpt(variant, dtype=torch.float64)
    idx = torch.randint(0, 61, (2, T), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(model(idx)[0], model(idx, pos_offset=shift)[0], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("attn_scale", ["none", "ssmax"])
@pytest.mark.parametrize("variant", ATTENTIONS)
def test_contiguous_positions_give_the_default_path_bit_for_bit(variant, attn_scale):
    """positions = 0 .. T-1 on every row reads the same table rows (rotary) or differences (ALiBi) as no
    positions."""
    model = tiny_gpt(variant, attn_scale=attn_scale)
    idx = torch.randint(0, 61, (3, 40), generator=torch.Generator().manual_seed(1))
    results = []
    for positions in (None, torch.arange(40).expand(3, 40)):
        model.zero_grad()
        _, loss = model(idx, idx, positions=positions)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.parametrize("variant", [v for v in ATTENTIONS if "slack" not in v])
@given(T=st.integers(2, 40), seed=st.integers(0, 1000), shifts=st.lists(st.integers(0, 20_000), min_size=2,
                                                                          max_size=2))
def test_outputs_depend_on_positions_only_through_their_differences(variant, T, seed, shifts):
    """Shift invariance at any positions: every row's positions moved by its own constant change nothing, for
    each method whose score reads m - n only (Slack reads m itself: test_attention.py)."""
    model = tiny_gpt(variant, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 61, (2, T), generator=g)
    pos = torch.randint(1, 300, (2, T), generator=g).cumsum(-1)
    moved = pos + torch.tensor(shifts)[:, None]
    torch.testing.assert_close(model(idx, positions=pos)[0], model(idx, positions=moved)[0], rtol=1e-8,
                               atol=1e-8)


def sharp_gpt(variant):
    """tiny_gpt with logits of order 1, so what the scores do with positions shows in the outputs."""
    model = tiny_gpt(variant, dtype=torch.float64)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(30)
    return model


def test_slack_outputs_move_with_the_positions_themselves():
    model = sharp_gpt("coca-slack")
    idx = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(0, 200, 10).expand(2, 20)
    assert not torch.allclose(model(idx, positions=pos)[0], model(idx, positions=pos + 777)[0], atol=1e-4)


@pytest.mark.parametrize("variant", ATTENTIONS)
def test_every_method_reads_the_positions_it_is_given(variant):
    model = sharp_gpt(variant)
    idx = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(0))
    spread = torch.arange(20).expand(2, 20) * torch.tensor([[1], [25]])  # row 0 contiguous, row 1 spread out
    got, plain = model(idx, positions=spread)[0], model(idx)[0]
    torch.testing.assert_close(got[0], plain[0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got[1, 1:], plain[1, 1:], atol=1e-4)  # position 0 alone sees only itself


def test_a_cache_refuses_positions():
    model = tiny_gpt()
    cache = KVCache(model.config, 1, 8)
    with pytest.raises(ValueError, match="contiguous positions"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache, positions=torch.arange(4)[None])


def test_ssmax_starts_at_one_over_log_block_size_and_learns():
    model = tiny_gpt("coca", attn_scale="ssmax", block_size=32)
    s = model.transformer.h[0].attn.ssmax
    torch.testing.assert_close(s, torch.full((2,), 1 / math.log(32)))
    idx = torch.randint(0, 61, (2, 32), generator=torch.Generator().manual_seed(0))
    model.train()
    model(idx, idx)[1].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    no_decay = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu").param_groups[1]["params"]
    assert any(p is s for p in no_decay)  # a per-head gain, not a weight matrix: no weight decay


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


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["coca", "coca-slack"])
def test_fast_path_forward_and_backward_at_4096_stay_below_one_TxTxD_tensor(variant):
    """Forward and backward at T = 4096 (2 layers, D = 64) in a fresh process; its peak resident memory
    must stay below one T x T x D float32 tensor (4 GiB), which the literal strict path would need."""
    out = run_script("-c", MEMORY_PROBE, variant)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    peak = r["after_kib"] * 1024
    assert torch.isfinite(torch.tensor(r["loss"]))
    assert peak < 4096 * 4096 * 64 * 4, f"peak resident memory {peak / 2**30:.2f} GiB"
