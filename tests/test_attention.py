"""Property tests of the attention paths in nanococa/model.py (the catalogue in shared/docs/coca.md)."""
import pytest
import torch
from hypothesis import example, given, strategies as st

from helpers import TOL, attn_inputs, randn
from nanococa.model import (ATTENTIONS, attention, coca_keys_literal, coca_scores_naive, rotary_cos_sin,
                            rotate, slack_scores_naive, tau_of)


def rot_for(s, dtype, offset=None, train_len=64):
    return rotary_cos_sin(s["offset"] if offset is None else offset, s["T"], s["D"], scaling=s["scaling"],
                          train_len=train_len, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", ATTENTIONS)
@given(s=attn_inputs())
@example(s=dict(B=1, H=1, T=150, D=128, offset=100_000, seed=1, scaling=("dynamic", 4.0)))
@example(s=dict(B=2, H=3, T=400, D=2, offset=99_999, seed=2, scaling=None))
def test_naive_equals_fast_forward_and_gradients(variant, dtype, s):
    shape = (s["B"], s["H"], s["T"], s["D"])
    rot = rot_for(s, dtype)
    outs, grads = [], []
    w = randn(shape, s["seed"] + 1, dtype, n=1)[0]
    for impl in ("naive", "fast"):
        q, t, v = (x.requires_grad_() for x in randn(shape, s["seed"], dtype))
        y = attention(variant, impl, q, t, v, rot, rot)
        (y * w).sum().backward()
        outs.append(y.detach())
        grads.append([q.grad, t.grad, v.grad])
    torch.testing.assert_close(outs[0], outs[1], **TOL[dtype])
    for name, a, b in zip("qtv", *grads):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"grad wrt {name}: {m}")


@given(s=attn_inputs(), data=st.data())
def test_theorem1_slack_equals_strict_under_constraint(s, data):
    """Theorem 1: with q[j] == q[j + D/2] for every plane (Eq. 11), Slack's scores equal Strict's."""
    shape = (s["B"], s["H"], s["T"], s["D"] // 2)
    half = randn(shape, s["seed"], torch.float64, n=1)[0]
    q = torch.cat((half, half), dim=-1)
    t = randn(q.shape, s["seed"] + 7, torch.float64, n=1)[0]
    rot = rot_for(s, torch.float64)
    torch.testing.assert_close(slack_scores_naive(q, t, rot, rot), coca_scores_naive(q, t, rot, rot),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_theorem1_slack_differs_from_strict_on_generic_queries(seed):
    q, t = randn((1, 2, 16, 8), seed, torch.float64, n=2)
    rot = rotary_cos_sin(0, 16, 8, dtype=torch.float64)
    gap = (slack_scores_naive(q, t, rot, rot) - coca_scores_naive(q, t, rot, rot)).abs().max()
    assert gap > 0.1, f"slack and strict scores differ by only {gap}"


@pytest.mark.parametrize("variant", ["coca", "rope"])
@pytest.mark.parametrize("impl", ["naive", "fast"])
@given(s=attn_inputs(), shift=st.integers(1, 100_000))
def test_shift_invariance_of_strict_and_rope(variant, impl, s, shift):
    shape = (s["B"], s["H"], s["T"], s["D"])
    q, t, v = randn(shape, s["seed"], torch.float64)
    r0 = rotary_cos_sin(s["offset"], s["T"], s["D"], dtype=torch.float64)
    r1 = rotary_cos_sin(s["offset"] + shift, s["T"], s["D"], dtype=torch.float64)
    torch.testing.assert_close(attention(variant, impl, q, t, v, r0, r0),
                               attention(variant, impl, q, t, v, r1, r1), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("shift", [1, 17, 500, 12_345])
def test_slack_is_not_shift_invariant(shift):
    q, t = randn((1, 2, 16, 8), 3, torch.float64, n=2)
    r0, r1 = rotary_cos_sin(0, 16, 8, dtype=torch.float64), rotary_cos_sin(shift, 16, 8, dtype=torch.float64)
    gap = (slack_scores_naive(q, t, r0, r0) - slack_scores_naive(q, t, r1, r1)).abs().max()
    assert gap > 0.05, f"slack scores moved by only {gap} under a shift of {shift}"


@given(s=attn_inputs(max_len=64))
def test_collinearity_of_literal_strict_keys(s):
    """Each key plane (k_j, k_{j+h}) is a non-negative multiple of its query plane (q_j, q_{j+h})."""
    q, t = randn((s["B"], s["H"], s["T"], s["D"]), s["seed"], torch.float64, n=2)
    k = coca_keys_literal(q, t)  # (B, H, Tq, Tk, D)
    k1, k2 = k.chunk(2, -1)
    q1, q2 = (x[:, :, :, None, :] for x in q.chunk(2, -1))
    torch.testing.assert_close(k1 * q2 - k2 * q1, torch.zeros_like(k1), rtol=0, atol=1e-12)  # parallel
    assert ((k1 * q1 + k2 * q2) >= 0).all()  # same direction
    # and the multiple is exactly tau_n[j]
    torch.testing.assert_close(k1, q1 * tau_of(t)[:, :, None, :, :], rtol=0, atol=0)


@given(s=attn_inputs())
def test_strict_score_is_a_cosine_of_the_distance(s):
    """Eq. 17: a(m, n) = sum_j tau_n[j] |q_m,j|^2 cos((m - n) theta_j) / sqrt(D)."""
    q, t = randn((s["B"], s["H"], s["T"], s["D"]), s["seed"], torch.float64, n=2)
    rot = rot_for(s, torch.float64)
    cos, sin = rot
    q1, q2 = q.chunk(2, -1)
    e = q1 * q1 + q2 * q2
    cos_mn = cos[:, None] * cos[None] + sin[:, None] * sin[None]  # (Tq, Tk, D/2)
    expected = (e[:, :, :, None, :] * tau_of(t)[:, :, None, :, :] * cos_mn).sum(-1) / s["D"] ** 0.5
    torch.testing.assert_close(coca_scores_naive(q, t, rot, rot), expected, rtol=1e-9, atol=1e-9)


def test_rotation_preserves_norm_and_composes():
    x = randn((3, 5, 16), 0, torch.float64, n=1)[0]
    c1, s1 = rotary_cos_sin(0, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, c1, s1).norm(dim=-1), x.norm(dim=-1))
    c2, s2 = rotary_cos_sin(7, 5, 16, dtype=torch.float64)
    c3, s3 = rotary_cos_sin(0, 1, 16, dtype=torch.float64)  # position 0 is the identity
    torch.testing.assert_close(rotate(x, c3, s3), x)
    c7, s7 = rotary_cos_sin(7, 1, 16, dtype=torch.float64)  # rotating by 7 more positions
    torch.testing.assert_close(rotate(rotate(x, c1, s1), c7, s7), rotate(x, c2, s2))
