"""Property tests of the attention paths in nanococa/model.py (the catalogue in docs/coca.md)."""
import math

import pytest
import torch
from hypothesis import example, given, strategies as st

from helpers import TOL, attn_inputs, randn
from nanococa.common import parse_scaling
from nanococa.model import (ATTENTIONS, NAIVE_SCORES, Scaling, alibi_flex, alibi_scores_naive, alibi_sdpa,
                            alibi_slopes, attention, coca_keys_literal, coca_scores_naive, flex_attention,
                            half_mean,
                            log_key_count, logn_scale, rope_scores_naive, rotary_at, rotary_cos_sin, rotate,
                            slack_scores_naive, tau_of)


def rot_for(s, dtype, offset=None, train_len=64):
    return rotary_cos_sin(s["offset"] if offset is None else offset, s["T"], s["D"], scaling=s["scaling"],
                          train_len=train_len, dtype=dtype)


def row_scale_for(s, kind, dtype):
    """None, one factor per query row (T, 1) as logn makes, or one per head and row (1, H, T, 1) as ssmax."""
    g = torch.Generator().manual_seed(s["seed"] + 2)
    if kind == "none":
        return None
    shape = (s["T"], 1) if kind == "row" else (1, s["H"], s["T"], 1)
    return (0.2 + 2 * torch.rand(shape, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", ATTENTIONS)
@given(s=attn_inputs(), scale=st.sampled_from(["none", "row", "head-row"]))
@example(s=dict(B=1, H=1, T=150, D=128, offset=100_000, seed=1, scaling=parse_scaling("dynamic:4")),
         scale="none")
@example(s=dict(B=2, H=3, T=400, D=2, offset=99_999, seed=2, scaling=None), scale="head-row")
def test_naive_equals_fast_forward_and_gradients(variant, dtype, s, scale):
    shape = (s["B"], s["H"], s["T"], s["D"])
    rot, slopes = rot_for(s, dtype), alibi_slopes(s["H"]).to(dtype)
    row_scale = row_scale_for(s, scale, dtype)
    outs, grads = [], []
    w = randn(shape, s["seed"] + 1, dtype, n=1)[0]
    for impl in ("naive", "fast"):
        q, t, v = (x.requires_grad_() for x in randn(shape, s["seed"], dtype))
        y = attention(variant, impl, q, t, v, rot=rot, slopes=slopes, row_scale=row_scale)
        (y * w).sum().backward()
        outs.append(y.detach())
        grads.append([q.grad, t.grad, v.grad])
    torch.testing.assert_close(outs[0], outs[1], **TOL[dtype])
    for name, a, b in zip("qtv", *grads):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"grad wrt {name}: {m}")


def increasing_positions(B, T, seed, spread, start=0):
    """(B, T) positions, strictly increasing along each row by random steps of 1 .. spread."""
    steps = torch.randint(1, spread + 1, (B, T), generator=torch.Generator().manual_seed(seed))
    return start + steps.cumsum(-1) - steps[:, :1]


@pytest.mark.parametrize("variant", ATTENTIONS)
@given(s=attn_inputs(max_len=120), spread=st.integers(1, 300),
       scale=st.sampled_from(["none", "row", "head-row"]))
def test_naive_equals_fast_at_any_increasing_positions(variant, s, spread, scale):
    """Training with position skips (--positions): every method takes positions (B, T), rotary ones through
    the rows of their tables at those positions, ALiBi through the differences; both paths agree."""
    shape = (s["B"], s["H"], s["T"], s["D"])
    pos = increasing_positions(s["B"], s["T"], s["seed"], spread, start=s["offset"] % 5000)
    rot, slopes = rotary_at(pos, s["D"], dtype=torch.float64), alibi_slopes(s["H"]).double()
    row_scale = row_scale_for(s, scale, torch.float64)
    outs, grads = [], []
    w = randn(shape, s["seed"] + 1, torch.float64, n=1)[0]
    for impl in ("naive", "fast"):
        q, t, v = (x.requires_grad_() for x in randn(shape, s["seed"], torch.float64))
        y = attention(variant, impl, q, t, v, rot=rot, slopes=slopes, pos=pos, row_scale=row_scale)
        (y * w).sum().backward()
        outs.append(y.detach())
        grads.append([q.grad, t.grad, v.grad])
    torch.testing.assert_close(outs[0], outs[1], **TOL[torch.float64])
    for name, a, b in zip("qtv", *grads):
        torch.testing.assert_close(a, b, **TOL[torch.float64], msg=lambda m: f"grad wrt {name}: {m}")


@given(s=attn_inputs(max_len=200), chunk=st.integers(1, 64), extra=st.integers(0, 40),
       scale=st.sampled_from(["none", "row", "head-row"]))
def test_alibi_chunked_path_equals_the_bias_matrix_for_queries_after_cached_keys(s, chunk, extra, scale):
    """Queries at the last Tq of Tk positions (a cache holds `extra` earlier keys), any query chunking."""
    Tq, Tk = s["T"], s["T"] + extra
    q = randn((s["B"], s["H"], Tq, s["D"]), s["seed"], torch.float64, n=1)[0]
    k, v = randn((s["B"], s["H"], Tk, s["D"]), s["seed"] + 1, torch.float64, n=2)
    slopes = alibi_slopes(s["H"]).double()
    row_scale = row_scale_for(s, scale, torch.float64)
    got = alibi_sdpa(q, k, v, slopes, row_scale, chunk=chunk)
    full_q = torch.cat((torch.zeros(s["B"], s["H"], extra, s["D"], dtype=torch.float64), q), dim=2)
    scores = alibi_scores_naive(full_q, k, slopes)[:, :, extra:]  # the rows of the last Tq positions
    if row_scale is not None:
        scores = scores * row_scale
    mask = torch.ones(Tq, Tk, dtype=torch.bool).tril(diagonal=extra)
    ref = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(flex_attention is None, reason="needs torch.nn.attention.flex_attention (torch >= 2.5)")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("scale", ["none", "head-row"])
def test_alibi_flex_score_mod_equals_the_bias_matrix(scale):
    """The FlexAttention form (run eagerly here; compiled on CUDA in test_gpu.py) builds the same bias."""
    s = dict(B=2, H=6, T=200, D=16, seed=3)
    q, k, v = randn((2, 6, 200, 16), 3, torch.float64)
    slopes = alibi_slopes(6).double()
    row_scale = row_scale_for(s, scale, torch.float64)
    got = alibi_flex(q, k, v, slopes, row_scale, kernel=flex_attention)
    torch.testing.assert_close(got, attention("alibi", "naive", q, k, v, slopes=slopes, row_scale=row_scale),
                               rtol=1e-10, atol=1e-10)


def test_alibi_slopes_follow_the_paper():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    # not a power of two: the 4-head slopes, then every other slope of the 8-head sequence
    torch.testing.assert_close(alibi_slopes(6), torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8,
                                                              2.0 ** -1, 2.0 ** -3]))
    assert alibi_slopes(1).tolist() == [2.0 ** -8]


@pytest.mark.parametrize("impl", ["naive", "fast"])
def test_alibi_weights_decay_geometrically_with_distance(impl):
    """With q = 0 the content term vanishes, so key n gets weight proportional to exp(-slope (m - n)): each
    step back multiplies it by exp(-slope). Catches a flipped sign or a misplaced slope in either path."""
    H, T = 4, 12
    q = torch.zeros(1, H, T, 8, dtype=torch.float64)
    k = torch.randn(1, H, T, 8, dtype=torch.float64)
    v = torch.eye(T, dtype=torch.float64).expand(1, H, T, T)  # the output row is the attention row
    slopes = alibi_slopes(H).double()
    att = attention("alibi", impl, q, k, v, slopes=slopes)
    m = T - 1
    ratio = att[0, :, m, 1:] / att[0, :, m, :-1]  # weight of key n+1 over key n
    torch.testing.assert_close(ratio, torch.exp(slopes)[:, None].expand(H, T - 1))
    assert torch.allclose(att[0, :, 3, 4:], torch.zeros(H, T - 4, dtype=torch.float64))  # causal


def test_logn_is_one_inside_the_training_window_and_log_ratio_beyond():
    log_m = log_key_count(0, 4096)
    scale = logn_scale(log_m, 512)[:, 0]
    assert torch.equal(scale[:512], torch.ones(512, dtype=torch.float64))
    torch.testing.assert_close(scale[4095], torch.tensor(math.log(4096) / math.log(512), dtype=torch.float64))
    assert (scale[512:].diff() > 0).all()


@pytest.mark.parametrize("signed", [False, True])
@given(s=attn_inputs(), data=st.data())
def test_theorem1_slack_equals_strict_under_constraint(signed, s, data):
    """Theorem 1: with q[j] == q[j + D/2] for every plane (Eq. 11), Slack's scores equal Strict's (the proof
    never uses the key's sign, so it holds for the signed rungs too)."""
    shape = (s["B"], s["H"], s["T"], s["D"] // 2)
    half = randn(shape, s["seed"], torch.float64, n=1)[0]
    q = torch.cat((half, half), dim=-1)
    t = randn(q.shape, s["seed"] + 7, torch.float64, n=1)[0]
    rot = rot_for(s, torch.float64)
    torch.testing.assert_close(slack_scores_naive(q, t, rot, signed), coca_scores_naive(q, t, rot, signed),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_theorem1_slack_differs_from_strict_on_generic_queries(seed, signed):
    q, t = randn((1, 2, 16, 8), seed, torch.float64, n=2)
    rot = rotary_cos_sin(0, 16, 8, dtype=torch.float64)
    gap = (slack_scores_naive(q, t, rot, signed) - coca_scores_naive(q, t, rot, signed)).abs().max()
    assert gap > 0.1, f"slack and strict scores differ by only {gap}"


@pytest.mark.parametrize("variant", ["coca", "rope", "phase-free", "coca-signed"])
@pytest.mark.parametrize("impl", ["naive", "fast"])
@given(s=attn_inputs(), shift=st.integers(1, 100_000))
def test_shift_invariance_of_strict_and_rope(variant, impl, s, shift):
    shape = (s["B"], s["H"], s["T"], s["D"])
    q, t, v = randn(shape, s["seed"], torch.float64)
    r0 = rotary_cos_sin(s["offset"], s["T"], s["D"], dtype=torch.float64)
    r1 = rotary_cos_sin(s["offset"] + shift, s["T"], s["D"], dtype=torch.float64)
    torch.testing.assert_close(attention(variant, impl, q, t, v, rot=r0),
                               attention(variant, impl, q, t, v, rot=r1), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shift", [1, 17, 500, 12_345])
def test_slack_is_not_shift_invariant(shift, signed):
    q, t = randn((1, 2, 16, 8), 3, torch.float64, n=2)
    r0, r1 = rotary_cos_sin(0, 16, 8, dtype=torch.float64), rotary_cos_sin(shift, 16, 8, dtype=torch.float64)
    gap = (slack_scores_naive(q, t, r0, signed) - slack_scores_naive(q, t, r1, signed)).abs().max()
    assert gap > 0.05, f"slack scores moved by only {gap} under a shift of {shift}"


@pytest.mark.parametrize("signed", [False, True])
@given(s=attn_inputs(max_len=64))
def test_collinearity_of_literal_strict_keys(signed, s):
    """Each key plane (k_j, k_{j+h}) is a multiple of its query plane (q_j, q_{j+h}): non-negative with the
    ReLU, of either sign without it (collinear, possibly anti-parallel)."""
    q, t = randn((s["B"], s["H"], s["T"], s["D"]), s["seed"], torch.float64, n=2)
    k = coca_keys_literal(q, t, signed)  # (B, H, Tq, Tk, D)
    k1, k2 = k.chunk(2, -1)
    q1, q2 = (x[:, :, :, None, :] for x in q.chunk(2, -1))
    torch.testing.assert_close(k1 * q2 - k2 * q1, torch.zeros_like(k1), rtol=0, atol=1e-12)  # parallel
    along = k1 * q1 + k2 * q2  # tau_n[j] |q_j|^2: against the query plane exactly where tau_n[j] < 0
    assert torch.equal(along < 0, (tau_of(t, signed) < 0)[:, :, None].expand_as(along))
    # and the multiple is exactly tau_n[j]
    torch.testing.assert_close(k1, q1 * tau_of(t, signed)[:, :, None, :, :], rtol=0, atol=0)


@pytest.mark.parametrize("signed", [False, True])
@given(s=attn_inputs())
def test_strict_score_is_a_cosine_of_the_distance(signed, s):
    """Eq. 17: a(m, n) = sum_j tau_n[j] |q_m,j|^2 cos((m - n) theta_j) / sqrt(D)."""
    q, t = randn((s["B"], s["H"], s["T"], s["D"]), s["seed"], torch.float64, n=2)
    rot = rot_for(s, torch.float64)
    cos, sin = rot
    q1, q2 = q.chunk(2, -1)
    e = q1 * q1 + q2 * q2
    cos_mn = cos[:, None] * cos[None] + sin[:, None] * sin[None]  # (Tq, Tk, D/2)
    expected = (e[:, :, :, None, :] * tau_of(t, signed)[:, :, None, :, :] * cos_mn).sum(-1) / s["D"] ** 0.5
    torch.testing.assert_close(coca_scores_naive(q, t, rot, signed), expected, rtol=1e-9, atol=1e-9)


@given(s=attn_inputs())
def test_phase_free_is_rope_on_real_planes(s):
    """The ladder's first rung: RoPE whose query and key planes are the real numbers [a, 0] and [b, 0] (a, b
    the plane means), so the angle between query and key is 0 or pi and only the rotation is left."""
    q, k = randn((s["B"], s["H"], s["T"], s["D"]), s["seed"], torch.float64, n=2)
    rot = rot_for(s, torch.float64)
    real = [torch.cat((half_mean(x), torch.zeros_like(half_mean(x))), -1) for x in (q, k)]
    torch.testing.assert_close(NAIVE_SCORES["phase-free"](q, k, rot), rope_scores_naive(*real, rot),
                               rtol=1e-9, atol=1e-9)


@given(seed=st.integers(0, 2**31 - 1), half=st.integers(1, 32), T=st.integers(2, 200))
def test_with_the_relu_and_equal_keys_a_strict_score_is_largest_at_distance_0(seed, half, T):
    """docs/coca.md section 3: with tau_n >= 0 and e_m >= 0 every term tau e cos(d theta) is at most tau e,
    its value at distance 0; so with the same key at every position the nearest key scores highest."""
    q, t = randn((1, 1, T, 2 * half), seed, torch.float64, n=2)
    t = t[:, :, :1].expand_as(t)  # one key content at every position
    scores = coca_scores_naive(q, t, rotary_cos_sin(0, T, 2 * half, dtype=torch.float64))
    last = scores[0, 0, -1]  # the last query against every key n <= m
    assert (last[:-1] <= last[-1] + 1e-12 * (1 + last[-1].abs())).all()


def test_without_the_relu_a_far_key_can_outscore_the_nearest():
    """The same property fails for coca-signed: one plane (theta = 1), tau = -1, e = 1: the score is -cos(d),
    -1 at distance 0 and -cos(3) = 0.99 at distance 3."""
    q = torch.tensor([1.0, 0.0], dtype=torch.float64).expand(1, 1, 4, 2)
    t = torch.tensor([-1.0, -1.0], dtype=torch.float64).expand(1, 1, 4, 2)
    rot = rotary_cos_sin(0, 4, 2, dtype=torch.float64)
    for signed, far_wins in ((True, True), (False, False)):
        last = coca_scores_naive(q, t, rot, signed)[0, 0, -1]
        assert bool(last[0] > last[-1]) == far_wins, (signed, last)
    expected = torch.tensor(-math.cos(3) / 2 ** 0.5, dtype=torch.float64)
    torch.testing.assert_close(coca_scores_naive(q, t, rot, True)[0, 0, -1, 0], expected)


def test_rotation_preserves_norm_and_composes():
    x = randn((3, 5, 16), 0, torch.float64, n=1)[0]
    c1, s1 = rotary_cos_sin(0, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, c1, s1).norm(dim=-1), x.norm(dim=-1))
    c2, s2 = rotary_cos_sin(7, 5, 16, dtype=torch.float64)
    c3, s3 = rotary_cos_sin(0, 1, 16, dtype=torch.float64)  # position 0 is the identity
    torch.testing.assert_close(rotate(x, c3, s3), x)
    c7, s7 = rotary_cos_sin(7, 1, 16, dtype=torch.float64)  # rotating by 7 more positions
    torch.testing.assert_close(rotate(rotate(x, c1, s1), c7, s7), rotate(x, c2, s2))


# --- YaRN (Peng et al. 2023, as Hugging Face's "yarn" rope type) ---

def yarn_reference(D, base, s, train_len):
    """Per plane, with nothing from the model file: (theta'_j list, attention factor). A plane keeps theta_j
    when it turns more than 32 times over the training length, gets theta_j / s when it turns less than once,
    and in between mixes the two by a weight linear in j from floor(j_32) to ceil(j_1), where j_r is the
    (fractional) plane that turns r times: train_len * base^(-2 j / D) = 2 pi r."""
    def plane(r):
        return D * math.log(train_len / (2 * math.pi * r)) / (2 * math.log(base))
    lo, hi = max(math.floor(plane(32)), 0), min(math.ceil(plane(1)), D - 1)
    out = []
    for j in range(D // 2):
        theta = base ** (-2 * j / D)
        w = min(1.0, max(0.0, (j - lo) / ((hi - lo) or 0.001)))  # 0: keep theta, 1: theta / s
        out.append(theta * (1 - w) + theta / s * w)
    return out, (0.1 * math.log(s) + 1 if s > 1 else 1.0)


@given(half=st.integers(2, 64), base=st.sampled_from([500.0, 10000.0, 100000.0]), s=st.floats(1.0, 64.0),
       train_len=st.sampled_from([16, 64, 512, 4096]), start=st.integers(0, 50_000))
def test_yarn_tables_equal_the_per_plane_formula(half, base, s, train_len, start):
    D = 2 * half
    cos, sin = rotary_cos_sin(start, 7, D, base, Scaling("yarn", s), train_len, dtype=torch.float64)
    thetas, factor = yarn_reference(D, base, s, train_len)
    for i, n in enumerate(range(start, start + 7)):
        for j, th in enumerate(thetas):
            assert cos[i, j].item() == pytest.approx(factor * math.cos(n * th), abs=1e-9)
            assert sin[i, j].item() == pytest.approx(factor * math.sin(n * th), abs=1e-9)


def test_yarn_keeps_fast_planes_and_interpolates_slow_ones():
    D, base, L, s = 64, 10000.0, 512, 8.0
    plain = rotary_cos_sin(1, 1, D, base, dtype=torch.float64)
    yarn = rotary_cos_sin(1, 1, D, base, Scaling("yarn", s), L, dtype=torch.float64)
    factor = 0.1 * math.log(s) + 1
    theta = torch.atan2(yarn[1], yarn[0])[0]  # position 1: the angle is theta'_j itself
    theta0 = torch.atan2(plain[1], plain[0])[0]
    turns = L * theta0 / (2 * math.pi)
    assert torch.allclose(theta[turns > 40], theta0[turns > 40])  # turn often: extrapolated, as trained
    assert torch.allclose(theta[turns < 0.5], theta0[turns < 0.5] / s)  # turn less than once: interpolated
    torch.testing.assert_close(yarn[0] ** 2 + yarn[1] ** 2, torch.full_like(yarn[0], factor ** 2))


@pytest.mark.parametrize("variant",
                         ["rope", "coca", "coca-slack", "phase-free", "coca-signed", "coca-slack-signed"])
def test_yarn_multiplies_every_logit_by_the_square_of_its_factor(variant):
    """The attention factor sits on cos and sin, so query and key both carry it: logits scale by its square
    (a factor on the query alone, or on neither, fails this)."""
    D, T, s = 16, 12, 16.0
    q, t = randn((1, 2, T, D), 4, torch.float64, n=2)
    scaled = rotary_cos_sin(0, T, D, scaling=Scaling("yarn", s), train_len=64, dtype=torch.float64)
    thetas, factor = yarn_reference(D, 10000.0, s, 64)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * torch.tensor(thetas, dtype=torch.float64)
    unit = (angles.cos(), angles.sin())  # YaRN's angles without its factor
    naive = NAIVE_SCORES[variant]
    torch.testing.assert_close(naive(q, t, scaled), factor ** 2 * naive(q, t, unit), rtol=1e-10, atol=1e-10)


def test_dynamic_yarn_is_a_no_op_inside_the_training_window_and_yarn_at_length_over_train_len_beyond():
    plain = rotary_cos_sin(0, 64, 16, dtype=torch.float64)
    dyn = rotary_cos_sin(0, 64, 16, scaling=Scaling("yarn-dynamic"), train_len=64, dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(plain, dyn))
    yarn_one = rotary_cos_sin(0, 64, 16, scaling=Scaling("yarn", 1.0), train_len=64, dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(plain, yarn_one))
    long = rotary_cos_sin(0, 200, 16, scaling=Scaling("yarn-dynamic"), train_len=64, dtype=torch.float64)
    static = rotary_cos_sin(0, 200, 16, scaling=Scaling("yarn", 200 / 64), train_len=64, dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(long, static))
