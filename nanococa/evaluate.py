"""Long-context evaluation behind eval_length.py: perplexity and passkey retrieval against length.

Perplexity protocols
  same-targets (default)  At every length L, score the same target tokens: the last `target` tokens of
                          windows that end at the same positions inside long validation documents, with
                          L - target tokens of context before them. Only the context changes between
                          columns, so a change from column to column is caused by the context alone.
  sliding                 The paper's: documents truncated to the largest length, a window of L tokens
                          sliding with stride 512, each token scored once (the first window scores all
                          of its tokens, later ones only the tokens they add).
Passkey retrieval (nanococa/passkey.py): the key at every depth bucket, greedy, Wilson intervals.

evaluate_models() runs the whole grid of eval_length.py (checkpoints x scalings x lengths): a scaling
that does nothing to a model (a rope scaling on ALiBi, which has no rotary) is measured once and the
repeat says so. attention_profile() measures how far and how sharply each layer attends, the
measurement behind docs/coca.md's account of dynamic NTK on CoCA; head_roles() finds previous-token,
induction and key-retrieving heads, the measurement behind its account of who learns passkey retrieval.
"""
import dataclasses
import math
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import passkey
from .common import fmt_time
from .errors import UserError
from .model import SDPA_QK, Scaling, alibi_scores_naive, log_key_count, logn_scale, rotary_cos_sin


def pick_windows(split, max_len, target, count, option="--lengths"):
    """Up to `count` windows [(document index, end)] in validation documents of at least max_len + 1 tokens:
    dealt to the documents in turn, and spread evenly over each document's possible ends (max_len + 1 to
    its last token), so they sample its whole length. Every length scores the tokens [end - target, end)."""
    lengths = [int(n) - 1 for n in split.doc_tokens]  # without the end-of-text token
    eligible = sorted((i for i, n in enumerate(lengths) if n >= max_len + 1), key=lambda i: -lengths[i])
    if not eligible:
        longest = max(range(len(lengths)), key=lambda i: lengths[i])
        raise UserError(f"length {max_len:,} needs a validation document of at least {max_len + 1:,} tokens; "
                        f"the longest is {split.names[longest]!r} with {lengths[longest]:,}: use shorter "
                        f"{option}")
    room = {i: (lengths[i] - max_len - 1) // target + 1 for i in eligible}  # disjoint targets that fit
    share = {i: 0 for i in eligible}
    for _ in range(count):  # deal the windows round-robin to documents that still have room
        open_docs = [i for i in eligible if share[i] < room[i]]
        if not open_docs:
            break
        share[min(open_docs, key=lambda i: share[i])] += 1
    windows = []
    for i in eligible:
        k = share[i]
        step = (room[i] - 1) // max(1, k - 1) if k > 1 else 0  # in units of target: spread over the room
        windows += [(i, max_len + 1 + j * step * target) for j in range(k)]
    return windows


@torch.no_grad()
def nll_of_last(model, ids, n_scored, scaling=None):
    """Sum of negative log-likelihoods of the last n_scored tokens of ids (1-D), given all before them."""
    x = ids[:-1].unsqueeze(0)
    h = model.hidden(x, scaling=scaling)[:, -n_scored:]
    logits = model.lm_head(h).float()
    return F.cross_entropy(logits[0], ids[-n_scored:], reduction="sum").item()


def same_targets_perplexity(model, split, windows, length, target, scaling=None, device="cpu"):
    """(perplexity, mean NLL of each window, scored target ids as a list per window) at one length."""
    per_window, scored = [], []
    for doc, end in windows:
        ids = torch.from_numpy(split.document(doc)[end - length - 1:end].astype("int64")).to(device)  # L + 1
        per_window.append(nll_of_last(model, ids, target, scaling) / target)
        scored.append(ids[-target:].tolist())
    return math.exp(sum(per_window) / len(per_window)), per_window, scored


def sliding_perplexity(model, split, docs, length, max_len, stride=512, scaling=None, device="cpu"):
    """(perplexity, mean NLL of each document, tokens scored): the paper's sliding window over documents
    truncated to max_len."""
    total, count, per_doc = 0.0, 0, []
    for doc in docs:
        ids = torch.from_numpy(split.document(doc)[:max_len + 1].astype("int64")).to(device)
        n, prev_end, doc_total = len(ids) - 1, 0, 0.0  # n predictions: token t + 1 from tokens 0..t
        for begin in range(0, n, stride):
            end = min(begin + length, n)
            doc_total += nll_of_last(model, ids[begin:end + 1], end - prev_end, scaling)
            prev_end = end
            if end == n:
                break
        total, count = total + doc_total, count + n
        per_doc.append(doc_total / n)
    return math.exp(total / count), per_doc, count


def bootstrap_interval(per_unit, draws=2000, seed=0):
    """95% percentile interval of exp(mean NLL) over units (windows or documents) drawn with replacement."""
    values = np.asarray(per_unit, dtype=np.float64)
    if len(values) < 2:
        return None, None
    idx = np.random.default_rng(seed).integers(0, len(values), size=(draws, len(values)))
    lo, hi = np.percentile(np.exp(values[idx].mean(axis=1)), [2.5, 97.5])
    return float(lo), float(hi)


def wilson_interval(hits, trials, z=1.96):
    """95% Wilson score interval of a success rate."""
    if trials == 0:
        return None, None
    p = hits / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def effective_scaling(model, scaling):
    """The scaling that acts on this model: ALiBi has no rotary, so a rope scaling does nothing to it."""
    return Scaling(logn=scaling.logn) if model.config.attention == "alibi" else scaling


@dataclasses.dataclass
class Plan:
    """What eval_length.py measures in every (checkpoint, scaling, length) cell."""
    lengths: list
    protocol: str = "same-targets"
    target: int = 512  # same-targets: tokens scored per window
    windows: Optional[list] = None  # same-targets: [(document, end)]
    docs: Optional[list] = None  # sliding: document indices
    stride: int = 512
    passkey_trials: int = 0
    passkey_lengths: Optional[list] = None  # the lengths that get passkey trials (None: every length)
    seed: int = 1337
    device: str = "cpu"


def measure(model, tok, split, plan, length, scaling):
    """One cell: perplexity with its interval and, when asked, passkey accuracy by depth bucket."""
    if plan.protocol == "same-targets":
        ppl, units, _ = same_targets_perplexity(model, split, plan.windows, length, plan.target, scaling,
                                                plan.device)
        count = len(plan.windows) * plan.target
    else:
        ppl, units, count = sliding_perplexity(model, split, plan.docs, length, max(plan.lengths),
                                               plan.stride, scaling, plan.device)
    lo, hi = bootstrap_interval(units, seed=plan.seed)
    row = dict(perplexity=ppl, perplexity_lo=lo, perplexity_hi=hi, units=len(units), targets=count,
               unit_nll=units, passkey_accuracy=None, passkey_lo=None, passkey_hi=None,
               passkey_trials=plan.passkey_trials or None, passkey_depth_hits=None, passkey_depth_trials=None,
               passkey_answer_nll=None, note=None)
    if plan.passkey_trials and length < passkey.min_length(tok):
        row["note"] = f"passkey needs at least {passkey.min_length(tok)} tokens"
    elif plan.passkey_trials and plan.passkey_lengths is not None and length not in plan.passkey_lengths:
        row.update(note="passkey not measured at this length (--passkey_lengths)", passkey_trials=None)
    elif plan.passkey_trials:
        pk = passkey.score(model, tok, length, plan.passkey_trials, scaling, plan.seed, plan.device)
        hits = sum(pk["hits"])
        buckets = passkey.depth_buckets(pk["depths"], pk["hits"])
        lo, hi = wilson_interval(hits, plan.passkey_trials)
        row.update(passkey_accuracy=hits / plan.passkey_trials, passkey_lo=lo, passkey_hi=hi,
                   passkey_depth_hits=[h for h, _ in buckets], passkey_depth_trials=[t for _, t in buckets],
                   passkey_answer_nll=[sum(t) / len(t) for t in zip(*pk["nll"])])
    return row


def evaluate_models(models, scalings, split, plan, corpus, log=print, after_each=None):
    """Every (checkpoint, scaling, length) cell: models [(path, model, tokenizer)], scalings [(name,
    Scaling)]. Rows in report.COLUMNS; after_each(rows) is called when a checkpoint x scaling row is
    complete."""
    rows, t_all, done_cells = [], time.perf_counter(), 0
    total = len(models) * len(scalings) * len(plan.lengths)
    for path, model, tok in models:
        measured = {}  # (effective scaling, length) -> its row: a scaling that does nothing is measured once
        for name, scaling in scalings:
            eff = effective_scaling(model, scaling)
            for n in plan.lengths:
                base = dict(checkpoint=path, attention=model.config.attention,
                            attn_scale=model.config.attn_scale, corpus=corpus, tokenizer=tok.name,
                            scaling=name, protocol=plan.protocol, length=n)
                done_cells += 1
                if (eff, n) in measured:
                    prev = measured[eff, n]
                    note = f"same as {prev['scaling']}: no rotary, so the rope scaling does nothing"
                    rows.append({**prev, **base, "note": "; ".join(filter(None, (prev["note"], note)))})
                    continue
                t0 = time.perf_counter()
                row = {**base, **measure(model, tok, split, plan, n, eff)}
                rows.append(row)
                measured[eff, n] = row
                elapsed = time.perf_counter() - t_all
                lo, hi, pk = row["perplexity_lo"], row["perplexity_hi"], row["passkey_accuracy"]
                band = f" ({lo:.2f}-{hi:.2f})" if lo else ""
                log(f"  {path} {model.config.attention} {name:>14} L={n:>6,}: ppl "
                    f"{row['perplexity']:9.3f}{band}"
                    + (f" passkey {pk:.2f}" if pk is not None else "")
                    + f"  ({time.perf_counter() - t0:.1f} s; {done_cells}/{total} cells, {fmt_time(elapsed)} "
                      "so far)")
            if after_each:
                after_each(rows)
    return rows

# -----------------------------------------------------------------------------------------------
# Where attention goes: mean distance and entropy per layer.


@torch.no_grad()
def attention_weights(model, ids, scaling=None, queries=None):
    """Per layer, the attention weights (H, queries, T) of the last `queries` queries (all by default) of one
    sequence ids (1-D), recomputed from each layer's input with the model file's own SDPA pairs."""
    cfg = model.config
    x = model.transformer.wte(ids[None])
    T, D, H = x.size(1), cfg.n_embd // cfg.n_head, cfg.n_head
    queries = queries or T
    scaling = scaling or Scaling()
    rot = None if cfg.attention == "alibi" else \
        rotary_cos_sin(0, T, D, cfg.rope_base, scaling, cfg.block_size, x.device, x.dtype)
    log_m = log_key_count(0, T, x.device)
    row_scale = logn_scale(log_m, cfg.block_size) if scaling.logn else None
    m, n = torch.arange(T - queries, T, device=x.device), torch.arange(T, device=x.device)
    future = m[:, None] < n[None, :]
    out = []
    for block in model.transformer.h:
        a = block.attn
        qtv = a.c_attn(block.ln_1(x)).split(cfg.n_embd, dim=2)
        q, t, _ = (z.view(1, T, H, D).transpose(1, 2) for z in qtv)
        if a.variant == "alibi":
            scores = alibi_scores_naive(q, t, a.slopes)[:, :, -queries:]
        else:
            qs, ks = SDPA_QK[a.variant](q, t, rot)
            scores = qs[:, :, -queries:] @ ks.transpose(-2, -1) / math.sqrt(D)
        scale = row_scale
        if a.ssmax is not None:
            s = a.ssmax[:, None, None] * log_m.to(a.ssmax.dtype)
            scale = s if scale is None else s * scale
        if scale is not None:
            scores = scores * scale[..., -queries:, :]
        out.append(scores.masked_fill(future, float("-inf")).softmax(-1)[0])
        x = block(x, rot, log_m, row_scale)
    return out


def attention_profile(model, ids, scaling=None, queries=64):
    """Where the last `queries` queries of one sequence ids (1-D) attend, per layer: the mean distance m - n
    weighted by attention and the mean entropy of their attention rows (nats), averaged over heads and
    queries."""
    T = ids.numel()
    distance = (torch.arange(T - queries, T)[:, None] - torch.arange(T)[None, :]).clamp(min=0).to(ids.device)
    return [dict(mean_distance=float((w * distance).sum(-1).mean()),
                 entropy=float(-(w * w.clamp(min=1e-30).log()).sum(-1).mean()))
            for w in attention_weights(model, ids, scaling, queries)]


def digit_starts(tok, ids):
    """Indices of the tokens of ids that hold a digit after one that does not: where each number begins."""
    digit = [any(c.isdigit() for c in tok.decode([t])) for t in ids]
    return [i for i, d in enumerate(digit) if d and not (i and digit[i - 1])]


@torch.no_grad()
def head_roles(model, tok, trials=8, period=128, seed=0):
    """Per layer, per head: the mean attention weight on (a) the previous token and (b) the token after the
    previous occurrence of the current one (where an induction head looks), over the second and later
    repeats of a random string of `period` tokens repeated to the training length, and (c) the key's first
    digit (both places the passkey text states the key) at the training length, from the query that must
    write it (where a head that retrieves the key looks; None when the training length is too short for a
    passkey text). Returns dict(previous, induction, passkey) of (layers, heads) lists."""
    g = np.random.default_rng(seed)
    T, device = model.config.block_size, next(model.parameters()).device
    period, with_passkey = min(period, T // 2), T >= passkey.min_length(tok)
    roles = dict(previous=0, induction=0, passkey=0)
    for _ in range(trials):
        letters = "".join(chr(c) for c in g.integers(ord("a"), ord("z") + 1, 4 * period))
        ids = (tok.encode(letters)[:period] * (T // period + 1))[:T]
        w = torch.stack(attention_weights(model, torch.tensor(ids, device=device)))  # (layers, H, T, T)
        m = torch.arange(period, T, device=device)
        roles["previous"] += w[..., m, m - 1].mean(-1) / trials
        roles["induction"] += w[..., m, m - period + 1].mean(-1) / trials
        if with_passkey:
            key = str(g.integers(10000, 100000))
            prompt, start, answer = passkey.build(tok, T, g.random(), key)
            digits = [start + i for i in digit_starts(tok, passkey.key_sentence(tok, key))]  # the key, twice
            query = len(prompt) - 1 + digit_starts(tok, answer)[0]  # the position that writes its first digit
            w = torch.stack(attention_weights(model, torch.tensor(prompt + answer, device=device)))
            roles["passkey"] += w[..., query, digits].sum(-1) / trials
    return {k: v.tolist() if torch.is_tensor(v) else None for k, v in roles.items()}


def profile_models(models, scalings, split, plan, queries=128):
    """attention_profile averaged over the plan's windows, for every (checkpoint, scaling, length): rows of
    dict(checkpoint, attention, scaling, length, layers=[{mean_distance, entropy}])."""
    rows = []
    for path, model, _ in models:
        for name, scaling in scalings:
            eff = effective_scaling(model, scaling)
            for n in plan.lengths:
                per_window = []
                for doc, end in plan.windows:
                    ids = torch.from_numpy(split.document(doc)[end - n:end].astype("int64")).to(plan.device)
                    per_window.append(attention_profile(model, ids, eff, min(queries, n)))
                layers = [{k: sum(w[i][k] for w in per_window) / len(per_window) for k in per_window[0][i]}
                          for i in range(len(per_window[0]))]
                rows.append(dict(checkpoint=path, attention=model.config.attention, scaling=name, length=n,
                                 layers=layers))
    return rows
