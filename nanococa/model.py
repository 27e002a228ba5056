"""
nanococa/model.py: a GPT with CoCA (Collinear Constrained Attention), Zhu et al., ACL 2024.

Read top to bottom. It holds:
  1. GPTConfig: the model's fields, each with its help.
  2. Positions: one rotary implementation (half-split layout) with the context extensions of a
     Scaling (dynamic NTK, position interpolation, YaRN in its static and dynamic forms), ALiBi's head
     slopes, and the length-aware row scales (logn at inference, ssmax trained).
  3. Attention, each variant a naive function (the equation, materialised) beside its fast form
     (plain scaled-dot-product attention, O(T*D) memory):
       rope        RoPE (RoFormer)                         rope_scores_naive        | rope_sdpa_qk
       coca        strict CoCA (Eqs. 7-9, 17)              coca_scores_naive        | coca_sdpa_qk
       coca-slack  CoCA-Slack (Eq. 10, the official code)  slack_scores_naive       | slack_sdpa_qk
       alibi       ALiBi (Press et al., 2022)              alibi_scores_naive       | alibi_sdpa
     and the ladder from RoPE to CoCA, one freedom removed per rung (docs/coca.md, section 12):
       phase-free  RoPE with real query and key planes     phase_free_scores_naive  | phase_free_sdpa_qk
       coca-signed strict CoCA without the key's ReLU      coca_scores_naive        | coca_sdpa_qk
       coca-slack-signed  CoCA-Slack without it            slack_scores_naive       | slack_sdpa_qk
     attention() runs either path; it is the one route to the fast path, with or without a cache.
  4. Kernels: FlexAttention for ALiBi on CUDA, compiled on first use.
  5. KVCache: keys in SDPA form and values, the position of the next token, its rotary rows.
  6. Block, GPT (tied embeddings, nanoGPT init), estimate_mfu, generate_stream / generate, the AdamW
     groups, and sample_next (temperature, top-k, top-p).
  7. The configuration's checks, which name the bad value and what is allowed.
The theory, the derivation of every fast form and the test behind each property: docs/coca.md.
The text grammar of a Scaling ("dynamic:4+logn") is nanococa.common.parse_scaling.
"""
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5: ALiBi takes the chunked SDPA path everywhere
    flex_attention = None

ATTENTIONS = ("coca", "coca-slack", "rope", "alibi", "phase-free", "coca-signed", "coca-slack-signed")
ATTN_IMPLS = ("fast", "naive")
ATTN_SCALES = ("none", "ssmax")
NAIVE_MAX_ELEMENTS = 2**27  # the largest tensor a naive path may materialise (elements)


def option(default, help):
    """A config field and its help text (train.py --help shows it; written once, here)."""
    return field(default=default, metadata={"help": help})


@dataclass
class GPTConfig:
    vocab_size: int = option(50304, "set by the tokenizer")
    block_size: int = option(512, "training context in tokens; context extension reaches beyond it")
    n_layer: int = option(6, "transformer blocks")
    n_head: int = option(6, "attention heads per block")
    n_embd: int = option(384, "width of the residual stream")
    dropout: float = option(0.0, "dropout probability")
    bias: bool = option(False, "biases in the linear layers and layer norms")
    attention: str = option("coca", " | ".join(ATTENTIONS))
    attn_impl: str = option("fast", "fast (the SDPA form) | naive (the literal equations): the same numbers")
    attn_scale: str = option("none", "none | ssmax (Scalable-Softmax: each row of logits times s_h log(m + "
                                     "1), s learned per head)")
    rope_base: float = option(10000.0, "rotary base: theta_j = base^(-2j/D)")

    def __post_init__(self):
        check_config(self)  # section 7

# -----------------------------------------------------------------------------------------------
# Positions. Rotary, half-split layout: plane j is the coordinate pair (j, j + D/2).


class Scaling(NamedTuple):
    """Context extension at inference. rope: None; "dynamic" (dynamic NTK, factor F); "linear" (position
    interpolation by F); "yarn" (YaRN with scale s = F) or "yarn-dynamic" (YaRN with s = L / L_train for
    a sequence of L tokens). logn: Qwen's query scale past the training length."""
    rope: Optional[str] = None
    factor: float = 1.0
    logn: bool = False


def yarn_frequencies(theta, base, s, train_len, beta_fast=32, beta_slow=1):
    """YaRN (Peng et al. 2023) as Hugging Face's "yarn" rope type: planes that turn more than beta_fast
    times over the training length keep theta_j, planes that turn fewer than beta_slow times get
    theta_j / s, and between them a ramp linear in the plane index. Returns (theta', attention factor
    0.1 ln s + 1), the factor to multiply cos and sin by, so logits grow by its square."""
    D = 2 * len(theta)

    def plane(turns):  # the (fractional) plane index whose frequency turns `turns` times over train_len
        return D * math.log(train_len / (turns * 2 * math.pi)) / (2 * math.log(base))
    low, high = max(math.floor(plane(beta_fast)), 0), min(math.ceil(plane(beta_slow)), D - 1)
    ramp = ((torch.arange(D // 2, dtype=torch.float64) - low) / ((high - low) or 0.001)).clamp(0, 1)
    return theta * (1 - ramp) + theta / s * ramp, 0.1 * math.log(s) + 1


def rotary_cos_sin(start, length, head_dim, base=10000.0, scaling=None, train_len=512, device=None,
                   dtype=torch.float32):
    """cos and sin of n * theta_j for positions n = start .. start+length-1, each (length, D/2). The
    dynamic forms size themselves for the sequence length L = start + length (a cache asks for all its
    positions at once, so that is the final length, fixed for the whole generation)."""
    kind, factor = (scaling or Scaling())[:2]
    L = start + length
    positions = torch.arange(start, L, dtype=torch.float64)
    if kind == "dynamic" and L > train_len and head_dim > 2:  # base (F L / L_train - (F - 1))^(D / (D - 2))
        base = base * (factor * L / train_len - (factor - 1)) ** (head_dim / (head_dim - 2))
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    mscale = 1.0
    if kind == "linear":
        positions = positions / factor
    elif kind in ("yarn", "yarn-dynamic"):
        s = factor if kind == "yarn" else max(1.0, L / train_len)
        if s > 1:
            theta, mscale = yarn_frequencies(theta, base, s, train_len)
    angles = positions[:, None] * theta[None, :]  # (length, D/2), float64 so n up to 1e5+ is exact
    return tuple((mscale * f(angles)).to(device=device, dtype=dtype) for f in (torch.cos, torch.sin))


def rotary_at(positions, head_dim, base=10000.0, scaling=None, train_len=512, dtype=torch.float32):
    """cos and sin at any positions (B, T) (training with position skips): each (B, 1, T, D/2), the rows of
    rotary_cos_sin's table for 0 .. max(positions), so both give the same numbers at the same position."""
    n = int(positions.max()) + 1
    return tuple(r[positions][:, None] for r in rotary_cos_sin(0, n, head_dim, base, scaling, train_len,
                                                              positions.device, dtype))


def rotate(x, cos, sin):
    """f(x, n) = x * cos(n theta) + rotate_half(x) * sin(n theta); x (..., T, D), cos/sin (T, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotate_real(a, cos, sin):
    """f([a, 0], n) = [a * cos(n theta), a * sin(n theta)]: a (..., T, D/2) -> (..., T, D)."""
    return torch.cat((a * cos, a * sin), dim=-1)


def alibi_slopes(n_head):
    """ALiBi's head slopes: 2^(-8/H), 2^(-16/H), ... for H a power of two; otherwise those of the power
    of two c below H, then every other slope of the 2c sequence until H are filled."""
    def geometric(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    c = 2 ** int(math.log2(n_head))
    return torch.tensor(geometric(c) + geometric(2 * c)[0::2][:n_head - c])


def log_key_count(start, length, device=None):
    """log(m + 1), the log of how many keys the query at position m sees, for m = start..; (length, 1)."""
    return torch.log1p(torch.arange(start, start + length, device=device, dtype=torch.float64))[:, None]


def logn_scale(log_m, train_len):
    """Qwen's logn attention (inference only): the row of query m times max(1, log(m + 1) / log(L_train))."""
    return (log_m / math.log(train_len)).clamp(min=1.0)

# -----------------------------------------------------------------------------------------------
# Attention. q, t (the key projection; CoCA's T of Eq. 5), v: (B, H, T, D). rot: (cos, sin), (T, D/2)
# each, of the T new positions. row_scale (.., T, 1): a factor per query's row of logits (logn, ssmax).


def check_budget(numel, what):
    if numel > NAIVE_MAX_ELEMENTS:
        raise RuntimeError(f"the naive {what} path would materialise {numel:,} elements, over its budget "
                           f"of {NAIVE_MAX_ELEMENTS:,}; use attn_impl='fast' (same numbers, O(T*D) memory)")


def causal_mask(Tq, Tk, device):
    """True where query i (the last Tq of Tk positions) may see key j: (Tq, Tk)."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)


def naive_attend(scores, v, dropout_p=0.0):
    """Explicit causal softmax over a (B, H, Tq, Tk) score matrix."""
    scores = scores.masked_fill(~causal_mask(scores.size(-2), scores.size(-1), v.device), float("-inf"))
    att = F.dropout(F.softmax(scores, dim=-1), p=dropout_p)
    return att @ v  # (B, H, Tq, D)


def sdpa(q, k, v, dropout_p=0.0, scale=None):
    """Causal SDPA for queries at the last Tq of Tk positions. is_causal alone would align the mask
    top-left when Tq < Tk, so that case gets an explicit bottom-right mask."""
    Tq, Tk = q.size(-2), k.size(-2)
    mask = None if Tq == Tk or Tq == 1 else causal_mask(Tq, Tk, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          is_causal=mask is None and Tq > 1, scale=scale)


def half_mean(x):
    """The mean of each plane's two coordinates: (..., D) -> (..., D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x1 + x2) / 2


def tau_of(t, signed=False):
    """Eq. 6, as in the official code: the mean of t's two halves, ReLU; signed=True leaves the ReLU out
    (the ladder's signed rungs). (B, H, T, D) -> (B, H, T, D/2)."""
    return half_mean(t) if signed else F.relu(half_mean(t))


# --- strict CoCA ---
def coca_keys_literal(q, t, signed=False):
    """Eq. 7: k_{m,n} = q_m * [tau_n, tau_n], one key per (query, key) pair: (B, H, Tq, Tk, D)."""
    tau = tau_of(t, signed)
    return q[:, :, :, None, :] * torch.cat((tau, tau), dim=-1)[:, :, None, :, :]


def coca_scores_naive(q, t, rot, signed=False):
    """Eqs. 8-9: a(m, n) = <f(q_m, m), f(k_{m,n}, n)> / sqrt(D), from the literal keys: (B, H, T, T)."""
    B, H, T, D = q.shape
    check_budget(B * H * T * T * D, "strict CoCA")
    k = rotate(coca_keys_literal(q, t, signed), *(r.unsqueeze(-3) for r in rot))  # key n's turn, every query
    return (rotate(q, *rot)[:, :, :, None, :] * k).sum(-1) / math.sqrt(D)


def coca_sdpa_qk(q, t, rot, signed=False):
    """Eq. 17 as an SDPA (query, key) pair: Q' = f([e, 0], m), K' = f([tau, 0], n), e_j = |q_j|^2."""
    q1, q2 = q.chunk(2, dim=-1)
    return rotate_real(q1 * q1 + q2 * q2, *rot), rotate_real(tau_of(t, signed), *rot)


# --- CoCA-Slack ---
def slack_scores_naive(q, t, rot, signed=False):
    """Eq. 10 as the official code: einsum(q, f([tau, tau], n), f(q, m)) / sqrt(D): (B, H, T, T)."""
    B, H, T, D = q.shape
    check_budget(B * H * T * T, "CoCA-Slack")
    tau = tau_of(t, signed)
    kk = rotate(torch.cat((tau, tau), dim=-1), *rot)
    return torch.einsum("bhmd,bhnd,bhmd->bhmn", q, kk, rotate(q, *rot)) / math.sqrt(D)


def slack_sdpa_qk(q, t, rot, signed=False):
    """Eq. 10 as an SDPA (query, key) pair: Q'' = q * f(q, m), K'' = f([tau, tau], n)."""
    tau = tau_of(t, signed)
    return q * rotate(q, *rot), rotate(torch.cat((tau, tau), dim=-1), *rot)


# --- phase-free: the ladder's first rung from RoPE toward CoCA ---
def phase_free_scores_naive(q, k, rot):
    """a(m, n) = sum_j a_m[j] b_n[j] cos((m - n) theta_j) / sqrt(D) with a, b the signed plane means of q and
    k: each plane's query and key are real numbers, so no angle lies between them. (B, H, T, T)"""
    B, H, T, D = q.shape
    check_budget(B * H * T * T * D // 2, "phase-free")
    cos, sin = rot
    cos_mn = cos[..., :, None, :] * cos[..., None, :, :] + sin[..., :, None, :] * sin[..., None, :, :]
    return (half_mean(q)[..., :, None, :] * half_mean(k)[..., None, :, :] * cos_mn).sum(-1) / math.sqrt(D)


def phase_free_sdpa_qk(q, k, rot):
    """The same as an SDPA (query, key) pair: f([a, 0], m), f([b, 0], n)."""
    return rotate_real(half_mean(q), *rot), rotate_real(half_mean(k), *rot)


# --- RoPE ---
def rope_scores_naive(q, k, rot):
    """RoFormer: a(m, n) = <f(q_m, m), f(k_n, n)> / sqrt(D): (B, H, T, T)."""
    B, H, T, D = q.shape
    check_budget(B * H * T * T, "RoPE")
    return rotate(q, *rot) @ rotate(k, *rot).transpose(-2, -1) / math.sqrt(D)


def rope_sdpa_qk(q, k, rot):
    """RoFormer as an SDPA (query, key) pair: f(q, m), f(k, n)."""
    return rotate(q, *rot), rotate(k, *rot)


# --- ALiBi ---
def alibi_scores_naive(q, k, slopes, pos=None):
    """ALiBi: a(m, n) = <q_m, k_n> / sqrt(D) - slope_h * (p_m - p_n), the bias matrix explicit: (B, H, T, T).
    pos: the positions p, (B, T) (default 0 .. T-1)."""
    B, H, T, D = q.shape
    check_budget(B * H * T * T, "ALiBi")
    p = torch.arange(T, device=q.device) if pos is None else pos
    distance = (p[..., :, None] - p[..., None, :]).to(q.dtype)[..., None, :, :]  # (1 or B, 1, T, T)
    return q @ k.transpose(-2, -1) / math.sqrt(D) - slopes.to(q.dtype)[:, None, None] * distance


def alibi_sdpa(q, k, v, slopes, row_scale=None, dropout_p=0.0, pos=None, chunk=512):
    """ALiBi as plain SDPA, queries at the last Tq of Tk positions. Softmax ignores a constant per row,
    so -slope_h (p_m - p_n) may become slope_h (p_n - p_m0) for any m0 fixed per chunk of queries: one
    extra coordinate, bias_q = slope_h sqrt(D) on the query and bias_k = p_n - p_m0 on the key. With m0
    the chunk's first query the added logits stay small where the weights are large (float32 at least)."""
    B, H, Tq, D = q.shape
    Tk = k.size(-2)
    work = torch.promote_types(q.dtype, torch.float32)  # positions are exact integers in float32
    bias_q = (slopes.to(work) * math.sqrt(D)).view(1, H, 1, 1)
    p = (torch.arange(Tk, device=q.device) if pos is None else pos).to(work).view(-1, 1, Tk, 1)
    out = []
    for s in range(0, Tq, chunk):
        e, m0 = min(s + chunk, Tq), Tk - Tq + s
        end = m0 + e - s  # keys past the chunk's last query are masked anyway
        bias_k = p[:, :, :end] - p[:, :, m0:m0 + 1]
        qc = torch.cat((q[:, :, s:e].to(work), bias_q.expand(B, H, e - s, 1)), -1)
        kc = torch.cat((k[:, :, :end].to(work), bias_k.expand(B, H, end, 1)), -1)
        vc = F.pad(v[:, :, :end].to(work), (0, 1))  # q, k, v of one width keep SDPA on its fast kernels
        if row_scale is not None:  # the whole row, bias included, as the naive path scales it
            qc = qc * row_scale[..., s:e, :].to(work)
        out.append(sdpa(qc, kc, vc, dropout_p, scale=1 / math.sqrt(D))[..., :-1].to(q.dtype))
    return torch.cat(out, dim=2)


def alibi_attend(q, k, v, slopes, row_scale=None, dropout_p=0.0, pos=None):
    """ALiBi's fast path: FlexAttention (section 4) for whole sequences on CUDA, else the SDPA form."""
    D = q.size(-1)
    flex_fits = q.size(-2) == k.size(-2) and dropout_p == 0 and D >= 16 and D & (D - 1) == 0
    if flex_attention is not None and q.is_cuda and flex_fits:
        return alibi_flex(q, k, v, slopes, row_scale, pos)
    return alibi_sdpa(q, k, v, slopes, row_scale, dropout_p, pos)


NAIVE_SCORES = {"coca": coca_scores_naive, "coca-slack": slack_scores_naive, "rope": rope_scores_naive,
                "phase-free": phase_free_scores_naive,
                "coca-signed": functools.partial(coca_scores_naive, signed=True),
                "coca-slack-signed": functools.partial(slack_scores_naive, signed=True)}
SDPA_QK = {"coca": coca_sdpa_qk, "coca-slack": slack_sdpa_qk, "rope": rope_sdpa_qk,
           "phase-free": phase_free_sdpa_qk,
           "coca-signed": functools.partial(coca_sdpa_qk, signed=True),
           "coca-slack-signed": functools.partial(slack_sdpa_qk, signed=True)}


def attention(variant, impl, q, t, v, *, rot=None, slopes=None, pos=None, row_scale=None, dropout_p=0.0,
              cache=None, layer=0):
    """One attention variant on (B, H, T, D) inputs; naive and fast give the same output. Positions reach the
    rotary variants through rot, ALiBi through pos ((B, T); None: 0 .. T-1). With a cache (fast only) this
    step's keys are stored in SDPA form and the queries attend to every key so far."""
    if row_scale is not None:
        row_scale = row_scale.to(q.dtype)
    if impl == "naive":
        if cache is not None:
            raise ValueError("the KV cache stores keys in SDPA form: use attn_impl='fast'")
        if variant == "alibi":
            scores = alibi_scores_naive(q, t, slopes, pos)
        else:
            scores = NAIVE_SCORES[variant](q, t, rot)
        return naive_attend(scores if row_scale is None else scores * row_scale, v, dropout_p)
    qs, ks = (q, t) if variant == "alibi" else SDPA_QK[variant](q, t, rot)
    if cache is not None:
        ks, v = cache.update(layer, ks, v)
    if variant == "alibi":
        return alibi_attend(qs, ks, v, slopes, row_scale, dropout_p, pos)
    return sdpa(qs if row_scale is None else qs * row_scale, ks, v, dropout_p)

# -----------------------------------------------------------------------------------------------
# Kernels. ALiBi through FlexAttention on CUDA: the bias is made per tile in score_mod, never as a matrix.


@functools.lru_cache(maxsize=16)
def causal_block_mask(T, device):
    return create_block_mask(lambda b, h, m, n: m >= n, None, None, T, T, device=device)


@functools.cache
def compiled_flex():
    """flex_attention compiled once, on first use (the uncompiled form is slow and memory hungry)."""
    return torch.compile(flex_attention)


def alibi_flex(q, k, v, slopes, row_scale=None, pos=None, kernel=None):
    """ALiBi through FlexAttention, Tq == Tk, with its penalty (and row scale) in score_mod."""
    H, T = q.size(1), q.size(2)
    rs = None if row_scale is None else row_scale.expand(1, H, T, 1).reshape(H, T).contiguous()
    p = None if pos is None else pos.expand(q.size(0), T).contiguous()

    def score_mod(score, b, h, m, n):
        score = score - slopes[h] * (m - n if p is None else p[b, m] - p[b, n])
        return score if rs is None else score * rs[h, m]
    mask = causal_block_mask(T, q.device)
    return (kernel or compiled_flex())(q, k, v, score_mod=score_mod, block_mask=mask)

# -----------------------------------------------------------------------------------------------
# The key/value cache.


class KVCache:
    """Keys in SDPA form (strict: K', slack: K'', rope: rotated k, alibi: k) and values of every layer,
    preallocated to max_len, and the position of the next token. Those keys depend on their own token
    and position only, so they stay valid as the sequence grows. The rotary rows are computed once for
    all max_len positions: dynamic NTK and dynamic YaRN size themselves for max_len, so cached keys
    never go stale; logn scales queries only, so it never touches them either."""

    def __init__(self, config, batch_size, max_len, device=None, dtype=torch.float32, scaling=None):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.scaling = checked_scaling(scaling)
        self.rot = None if config.attention == "alibi" else rotary_cos_sin(
            0, max_len, head_dim, config.rope_base, self.scaling, config.block_size, device, dtype)
        self.max_len, self.pos = max_len, 0

    def next_positions(self, T):
        """(first position, rotary rows or None) of the next T tokens; refuses to run past max_len."""
        if self.pos + T > self.max_len:
            raise ValueError(f"cache holds {self.max_len} positions; {self.pos} used, {T} more asked")
        return self.pos, None if self.rot is None else tuple(r[self.pos:self.pos + T] for r in self.rot)

    def update(self, layer, k, v):
        """Write k, v (B, H, T, D) at the current position; return all keys and values so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T):
        self.pos += T


def checked_scaling(scaling):
    if scaling is None:
        return Scaling()
    if not isinstance(scaling, Scaling):
        raise TypeError(f"scaling {scaling!r} is not a Scaling (nanococa.common.parse_scaling reads text)")
    return scaling

# -----------------------------------------------------------------------------------------------
# The transformer.


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.layer = config.n_head, layer
        self.variant, self.impl, self.dropout = config.attention, config.attn_impl, config.dropout
        # q, v and, for CoCA, the T projection that takes the place of K (Eq. 5); for RoPE and ALiBi, k
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.register_buffer("slopes", alibi_slopes(config.n_head) if config.attention == "alibi" else None,
                             persistent=False)
        # Scalable-Softmax: s starts at 1 / log(block_size), so a row at the end of a training window is
        # scaled by exactly 1 at initialisation (ordinary attention there) and rows beyond it sharpen
        self.ssmax = nn.Parameter(torch.full((config.n_head,), 1 / math.log(config.block_size))) \
            if config.attn_scale == "ssmax" else None

    def forward(self, x, rot, log_m, row_scale=None, cache=None, pos=None):
        B, T, C = x.size()
        q, t, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for z in self.c_attn(x).split(C, dim=2))  # (B, H, T, D) each
        if self.ssmax is not None:  # each row of logits times s_h * log(m + 1): (H, T, 1)
            s = self.ssmax[:, None, None] * log_m.to(self.ssmax.dtype)
            row_scale = s if row_scale is None else s * row_scale
        y = attention(self.variant, self.impl, q, t, v, rot=rot, slopes=self.slopes, pos=pos,
                      row_scale=row_scale, dropout_p=self.dropout if self.training else 0.0, cache=cache,
                      layer=self.layer)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rot, log_m, row_scale=None, cache=None, pos=None):
        x = x + self.attn(self.ln_1(x), rot, log_m, row_scale, cache, pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # no position table: rotary or ALiBi
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of the residual projections (GPT-2)
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def hidden(self, idx, cache=None, pos_offset=0, scaling=None, positions=None):
        """Final-layer-norm hidden states (B, T, C). With a cache, idx continues the cached sequence
        (position and scaling come from the cache); else positions start at pos_offset, or are given:
        positions (B, T), increasing along each row (training with position skips, --positions)."""
        B, T = idx.size()
        cfg = self.config
        x = self.transformer.drop(self.transformer.wte(idx))
        if cache is not None:
            if positions is not None:
                raise ValueError("a KV cache keeps contiguous positions: give positions without a cache")
            (start, rot), scaling = cache.next_positions(T), cache.scaling
        else:
            start, scaling, D = pos_offset, checked_scaling(scaling), cfg.n_embd // cfg.n_head
            if cfg.attention == "alibi":
                rot = None
            elif positions is None:
                rot = rotary_cos_sin(start, T, D, cfg.rope_base, scaling, cfg.block_size, x.device, x.dtype)
            else:
                rot = rotary_at(positions, D, cfg.rope_base, scaling, cfg.block_size, x.dtype)
        log_m = log_key_count(start, T, idx.device)  # (T, 1), for logn and ssmax: the number of keys, m + 1
        row_scale = logn_scale(log_m, cfg.block_size) if scaling.logn else None
        for block in self.transformer.h:
            x = block(x, rot, log_m, row_scale, cache, positions)
        if cache is not None:
            cache.advance(T)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, **kw):
        """(logits (B, T, vocab), mean cross-entropy or None). Keywords go to hidden()."""
        logits = self.lm_head(self.hidden(idx, **kw))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return adamw(self.parameters(), weight_decay, learning_rate, betas, device_type)

    def flops_per_token(self, T):
        """nanoGPT's estimate (PaLM appendix B): 6N + 12 L H Q T. CoCA's extra work is elementwise."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: achieved FLOPs per second over the device's peak_flops."""
        return self.flops_per_token(self.config.block_size) * tokens_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, scaling=None,
                        prefill_chunk=1024, generator=None):
        """Yield each next token (B,) as it is chosen: chunked prefill of idx (B, T) into a cache sized
        for T + max_new_tokens, then one token at a time. temperature 0 is greedy."""
        B, T = idx.shape
        p = next(self.parameters())
        cache = KVCache(self.config, B, T + max_new_tokens, p.device, p.dtype, scaling)
        for s in range(0, T, prefill_chunk):
            h = self.hidden(idx[:, s:s + prefill_chunk], cache=cache)
        for i in range(max_new_tokens):
            nxt = sample_next(self.lm_head(h[:, -1]).float(), temperature, top_k, top_p, generator)
            yield nxt
            if i + 1 < max_new_tokens:
                h = self.hidden(nxt[:, None], cache=cache)

    def generate(self, idx, max_new_tokens, **kw):
        """idx (B, T) followed by max_new_tokens sampled tokens: (B, T + max_new_tokens)."""
        return torch.cat([idx] + [t[:, None] for t in self.generate_stream(idx, max_new_tokens, **kw)], dim=1)


def adamw(parameters, weight_decay, learning_rate, betas, device_type):
    """AdamW with two groups: matrices (embeddings, linear weights) decay; vectors (norm weights, biases,
    ssmax's s) do not, since shrinking a gain or an offset toward 0 is no regulariser. Fused on CUDA."""
    params = [p for p in parameters if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of logits (B, vocab): greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest set whose mass reaches top_p,
        drop[:, 0] = False  # and always the most likely token (a top_p that rounds to 0 would drop them all)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]

# -----------------------------------------------------------------------------------------------
# Configuration checks.


def check_config(cfg):
    """GPTConfig's checks: a ValueError names the bad value and what is allowed."""
    choices = (("attention", ATTENTIONS), ("attn_impl", ATTN_IMPLS), ("attn_scale", ATTN_SCALES))
    for name, allowed in choices:
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name}={getattr(cfg, name)!r} is not one of {allowed}")
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
    if (cfg.n_embd // cfg.n_head) % 2 and cfg.attention != "alibi":
        raise ValueError(f"head dimension n_embd/n_head={cfg.n_embd // cfg.n_head} is odd; "
                         f"{cfg.attention} rotates coordinate pairs and needs an even head dimension")
    if not isinstance(cfg.dropout, (int, float)) or not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout={cfg.dropout!r} must be in [0, 1)")
    if not isinstance(cfg.bias, bool):
        raise ValueError(f"bias={cfg.bias!r} must be true or false")
    if not isinstance(cfg.rope_base, (int, float)) or not 1.0 < cfg.rope_base < math.inf:
        raise ValueError(f"rope_base={cfg.rope_base!r} must be a finite number greater than 1")
    if cfg.attn_scale == "ssmax" and cfg.block_size < 2:
        raise ValueError("attn_scale='ssmax' needs block_size >= 2 (s starts at 1 / log(block_size))")
