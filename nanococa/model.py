"""
nanococa/model.py: a GPT with CoCA (Collinear Constrained Attention), Zhu et al., ACL 2024.

Read top to bottom. It holds:
  1. GPTConfig, with checks that name the bad value and what is allowed.
  2. One rotary implementation (half-split layout) with a position offset and context extension:
     dynamic NTK ("dynamic", factor) and position interpolation ("linear", factor).
  3. Attention, three variants, each as a naive function (the paper's equation, materialised)
     beside a fast function (the same numbers as plain scaled-dot-product attention, O(T*D)):
       rope        vanilla RoPE
       coca        strict CoCA (Eqs. 7-9, 17); fast form Q' = f([e, 0], m), K' = f([tau, 0], n)
       coca-slack  CoCA-Slack (Eq. 10), what the official code computes
  4. KVCache: preallocated keys in SDPA form (K', K'' or rotated K) and values, chunked prefill.
  5. Block, GPT (tied embeddings, nanoGPT init), configure_optimizers, estimate_mfu, generate.
Equations and the derivation of the fast forms: ../shared/docs/coca.md (README has the short form).
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTIONS = ("coca", "coca-slack", "rope")
ATTN_IMPLS = ("fast", "naive")
SCALINGS = ("dynamic", "linear")
NAIVE_MAX_ELEMENTS = 2**27  # the largest tensor a naive path may materialise (elements)


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 512  # training context; dynamic NTK extends beyond it
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False
    attention: str = "coca"  # "coca" (strict), "coca-slack" or "rope"
    attn_impl: str = "fast"  # "fast" (SDPA form) or "naive" (literal equations)
    rope_base: float = 10000.0

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTIONS}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={self.attn_impl!r} is not one of {ATTN_IMPLS}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head dimension n_embd/n_head={self.n_embd // self.n_head} is odd; "
                             "rotary needs an even head dimension")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        if not self.rope_base > 1.0:
            raise ValueError(f"rope_base={self.rope_base!r} must be greater than 1")

# -----------------------------------------------------------------------------------------------
# Rotary position embedding, half-split layout: plane j is the coordinate pair (j, j + D/2).


def parse_scaling(scaling):
    """None, "none", ("dynamic", 4), "dynamic:4", ("linear", 8) or "linear:8" -> None or (kind, factor)."""
    if scaling is None or scaling == "none":
        return None
    if isinstance(scaling, str):
        kind, _, factor = scaling.partition(":")
        try:
            scaling = (kind, float(factor))
        except ValueError:
            raise ValueError(f"rope scaling {scaling!r}: factor {factor!r} is not a number") from None
    kind, factor = scaling
    if kind not in SCALINGS or not factor >= 1.0:
        raise ValueError(f"rope scaling {scaling!r}: use none, dynamic:F or linear:F with F >= 1")
    return kind, float(factor)


def rotary_cos_sin(start, length, head_dim, base=10000.0, scaling=None, train_len=512, device=None,
                   dtype=torch.float32):
    """cos and sin of n * theta_j for positions n = start .. start+length-1, each (length, D/2).
    Dynamic NTK sizes its base for the sequence length seq_len = start + length (a cache asks for
    all its positions at once, so that is the final length, fixed for the whole generation)."""
    scaling = parse_scaling(scaling)
    seq_len = start + length
    positions = torch.arange(start, start + length, device=device, dtype=torch.float64)
    if scaling and scaling[0] == "dynamic" and seq_len > train_len and head_dim > 2:
        factor = scaling[1]  # base' = base * (factor * L / L_train - (factor - 1)) ** (D / (D - 2))
        base = base * (factor * seq_len / train_len - (factor - 1)) ** (head_dim / (head_dim - 2))
    if scaling and scaling[0] == "linear":
        positions = positions / scaling[1]  # position interpolation
    theta = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    angles = positions[:, None] * theta[None, :]  # (length, D/2), float64 so n up to 1e5+ is exact
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x, cos, sin):
    """f(x, n) = x * cos(n theta) + rotate_half(x) * sin(n theta); x (..., T, D), cos/sin (T, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotate_real(a, cos, sin):
    """f([a, 0], n) = [a * cos(n theta), a * sin(n theta)]: a (..., T, D/2) -> (..., T, D)."""
    return torch.cat((a * cos, a * sin), dim=-1)


# -----------------------------------------------------------------------------------------------
# Attention. q, t (or k), v: (B, H, T, D). rq, rk: (cos, sin) of the query and key positions.
# Queries are the last Tq of the Tk key positions (Tq < Tk when a cache holds earlier keys).


def check_budget(numel, what):
    if numel > NAIVE_MAX_ELEMENTS:
        raise RuntimeError(f"the naive {what} path would materialise {numel:,} elements, over its budget "
                           f"of {NAIVE_MAX_ELEMENTS:,}; use attn_impl='fast' (same numbers, O(T*D) memory)")


def causal_mask(Tq, Tk, device):
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)  # (Tq, Tk)


def naive_attend(scores, v, dropout_p=0.0):
    """Explicit causal softmax over a (B, H, Tq, Tk) score matrix."""
    scores = scores.masked_fill(~causal_mask(scores.size(-2), scores.size(-1), v.device), float("-inf"))
    att = F.dropout(F.softmax(scores, dim=-1), p=dropout_p)
    return att @ v  # (B, H, Tq, D)


def sdpa(q, k, v, dropout_p=0.0):
    """Causal SDPA for queries at the last Tq of Tk positions. is_causal alone would align the mask
    top-left when Tq < Tk, so that case gets an explicit bottom-right mask."""
    Tq, Tk = q.size(-2), k.size(-2)
    if Tq == Tk or Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=Tq > 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(Tq, Tk, q.device), dropout_p=dropout_p)


def tau_of(t):
    """Eq. 6, as in the official code: the mean of t's two halves, ReLU. (B, H, T, D) -> (B, H, T, D/2)."""
    t1, t2 = t.chunk(2, dim=-1)
    return F.relu((t1 + t2) / 2)


# --- strict CoCA ---
def coca_keys_literal(q, t):  # Eq. 7: k_{m,n} = q_m * [tau_n, tau_n], one key per pair, (B, H, Tq, Tk, D)
    tau = tau_of(t)
    return q[:, :, :, None, :] * torch.cat((tau, tau), dim=-1)[:, :, None, :, :]


def coca_scores_naive(q, t, rq, rk):  # Eqs. 8-9: a(m, n) = <f(q_m, m), f(k_{m,n}, n)> / sqrt(D)
    B, H, Tq, D = q.shape
    check_budget(B * H * Tq * t.size(2) * D, "strict CoCA")
    k = rotate(coca_keys_literal(q, t), *rk)  # rk's (Tk, D/2) broadcasts over (Tq, Tk, D/2)
    return (rotate(q, *rq)[:, :, :, None, :] * k).sum(-1) / math.sqrt(D)


def coca_fast(q, t, rq, rk):  # Eq. 17 as SDPA: Q' = f([e, 0], m), K' = f([tau, 0], n), e_j = |q_j|^2
    q1, q2 = q.chunk(2, dim=-1)
    return rotate_real(q1 * q1 + q2 * q2, *rq), rotate_real(tau_of(t), *rk)


# --- CoCA-Slack ---
def slack_scores_naive(q, t, rq, rk):  # Eq. 10 as the official code: einsum(q, f([tau, tau]), f(q)) / sqrt(D)
    B, H, Tq, D = q.shape
    check_budget(B * H * Tq * t.size(2), "CoCA-Slack")
    tau = tau_of(t)
    kk = rotate(torch.cat((tau, tau), dim=-1), *rk)
    return torch.einsum("bhmd,bhnd,bhmd->bhmn", q, kk, rotate(q, *rq)) / math.sqrt(D)


def slack_fast(q, t, rq, rk):  # Eq. 10 as SDPA: Q'' = q * f(q, m), K'' = f([tau, tau], n)
    tau = tau_of(t)
    return q * rotate(q, *rq), rotate(torch.cat((tau, tau), dim=-1), *rk)


# --- RoPE ---
def rope_scores_naive(q, k, rq, rk):  # RoFormer: a(m, n) = <f(q_m, m), f(k_n, n)> / sqrt(D)
    B, H, Tq, D = q.shape
    check_budget(B * H * Tq * k.size(2), "RoPE")
    return rotate(q, *rq) @ rotate(k, *rk).transpose(-2, -1) / math.sqrt(D)


def rope_fast(q, k, rq, rk):  # RoFormer as SDPA: f(q, m), f(k, n)
    return rotate(q, *rq), rotate(k, *rk)


NAIVE_SCORES = {"coca": coca_scores_naive, "coca-slack": slack_scores_naive, "rope": rope_scores_naive}
FAST_QK = {"coca": coca_fast, "coca-slack": slack_fast, "rope": rope_fast}


def attention(variant, impl, q, t, v, rq, rk, dropout_p=0.0):
    """One attention variant on (B, H, T, D) inputs; the naive and fast paths give the same output."""
    if impl == "naive":
        return naive_attend(NAIVE_SCORES[variant](q, t, rq, rk), v, dropout_p)
    return sdpa(*FAST_QK[variant](q, t, rq, rk), v, dropout_p)


class KVCache:
    """Per-layer keys in SDPA form (strict: K', slack: K'', rope: rotated K) and values, preallocated
    to max_len. Those keys depend on their own token and position only, so they stay valid as the
    sequence grows. The rotary tables are computed once for all max_len positions: dynamic NTK sizes its
    base for max_len, the final length, so cached keys never go stale."""

    def __init__(self, config, batch_size, max_len, device=None, dtype=torch.float32, rope_scaling=None):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.rot = rotary_cos_sin(0, max_len, head_dim, config.rope_base, rope_scaling, config.block_size,
                                  device=device, dtype=dtype)  # (max_len, D/2) each
        self.max_len, self.pos = max_len, 0

    def update(self, layer, k, v):
        """Write k, v (B, H, T, D) at the current position; return all keys and values so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

# -----------------------------------------------------------------------------------------------
# The transformer.


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.layer = config.n_head, layer
        self.variant, self.impl, self.dropout = config.attention, config.attn_impl, config.dropout
        # q, v and, for CoCA, the T projection that takes the place of K (Eq. 5); for RoPE, k
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rot, cache=None):
        B, T, C = x.size()
        q, t, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for z in self.c_attn(x).split(C, dim=2))  # (B, H, T, D) each
        dropout_p = self.dropout if self.training else 0.0
        if cache is None:
            y = attention(self.variant, self.impl, q, t, v, rot, rot, dropout_p)
        else:
            if self.impl != "fast":
                raise ValueError("the KV cache stores keys in SDPA form: use attn_impl='fast'")
            qs, ks = FAST_QK[self.variant](q, t, rot, rot)
            ks, vs = cache.update(self.layer, ks, v)
            y = sdpa(qs, ks, vs, dropout_p)
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

    def forward(self, x, rot, cache=None):
        x = x + self.attn(self.ln_1(x), rot, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # no position table: rotary does it
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

    def hidden(self, idx, cache=None, pos_offset=0, rope_scaling=None):
        """Final-layer-norm hidden states (B, T, C). With a cache, idx continues the cached sequence
        (position and rope scaling come from the cache); else positions start at pos_offset."""
        B, T = idx.size()
        cfg = self.config
        x = self.transformer.drop(self.transformer.wte(idx))
        if cache is not None:
            if cache.pos + T > cache.max_len:
                raise ValueError(f"cache holds {cache.max_len} positions; {cache.pos} used, {T} more asked")
            rot = tuple(r[cache.pos:cache.pos + T] for r in cache.rot)
        else:
            rot = rotary_cos_sin(pos_offset, T, cfg.n_embd // cfg.n_head, cfg.rope_base, rope_scaling,
                                 cfg.block_size, device=idx.device, dtype=x.dtype)
        for block in self.transformer.h:
            x = block(x, rot, cache)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, **kw):
        """(logits (B, T, vocab), mean cross-entropy or None). Keywords go to hidden()."""
        logits = self.lm_head(self.hidden(idx, **kw))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # no decay: norms, biases
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self, T):
        """nanoGPT's estimate (PaLM appendix B): 6N + 12 L H Q T. CoCA's extra work is elementwise."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops=989e12):
        """Model FLOPs utilisation over peak_flops (default: H100 SXM dense bf16)."""
        return self.flops_per_token(self.config.block_size) * tokens_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, rope_scaling=None,
                 prefill_chunk=1024, generator=None, on_token=None):
        """Cached sampling: chunked prefill of idx (B, T), then one token at a time. temperature 0 is
        greedy. on_token(tokens (B,)) is called as each token is chosen. Returns (B, T + new)."""
        B, T = idx.shape
        p = next(self.parameters())
        cache = KVCache(self.config, B, T + max_new_tokens, p.device, p.dtype, rope_scaling)
        for s in range(0, T, prefill_chunk):
            h = self.hidden(idx[:, s:s + prefill_chunk], cache=cache)
        out = [idx]
        for i in range(max_new_tokens):
            logits = self.lm_head(h[:, -1]).float()  # (B, vocab)
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            out.append(nxt[:, None])
            if on_token is not None:
                on_token(nxt)
            if i + 1 < max_new_tokens:
                h = self.hidden(nxt[:, None], cache=cache)
        return torch.cat(out, dim=1)


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
        cum = F.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - F.softmax(sorted_logits, dim=-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
