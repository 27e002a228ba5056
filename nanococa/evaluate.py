"""Long-context evaluation behind eval_length.py: perplexity and passkey retrieval against length.

Perplexity protocols
  same-targets (default)  At every length L, score the same target tokens: the last `target` tokens of
                          windows that end at the same positions inside long validation documents, with
                          L - target tokens of context before them. Only the context changes between
                          columns, so a change from column to column is caused by the context alone.
  sliding                 The paper's: documents truncated to the largest length, a window of L tokens
                          sliding with stride 512, each token scored once (the first window scores all
                          of its tokens, later ones only the tokens they add).
Passkey (Mohtashami and Jaggi, 2023): filler sentences with "The pass key is NNNNN. Remember it. NNNNN
is the pass key." at a chosen depth, then "What is the pass key? The pass key is"; the five digits are
decoded greedily with the KV cache.
"""
import csv
import itertools
import json
import math
import os
import random

import torch
import torch.nn.functional as F

from .errors import UserError

PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


def pick_windows(split, max_len, target, count):
    """Up to `count` windows [(document index, end)], taken in turn from each document of at least
    max_len + 1 tokens, ends `target` apart; every length scores the document's tokens [end - target, end)."""
    lengths = [int(n) - 1 for n in split.doc_tokens]  # without the end-of-text token
    eligible = sorted((i for i, n in enumerate(lengths) if n >= max_len + 1), key=lambda i: -lengths[i])
    if not eligible:
        longest = max(range(len(lengths)), key=lambda i: lengths[i])
        raise UserError(f"length {max_len:,} needs a validation document of at least {max_len + 1:,} tokens; the "
                        f"longest is {split.names[longest]!r} with {lengths[longest]:,}: use shorter --lengths")
    ends = [[(i, e) for e in range(max_len + 1, lengths[i] + 1, target)] for i in eligible]
    windows = [w for row in itertools.zip_longest(*ends) for w in row if w][:count]  # round-robin over documents
    return windows


@torch.no_grad()
def nll_of_last(model, ids, n_scored, rope_scaling=None):
    """Sum of negative log-likelihoods of the last n_scored tokens of ids (1-D), given all before them."""
    x = ids[:-1].unsqueeze(0)
    h = model.hidden(x, rope_scaling=rope_scaling)[:, -n_scored:]
    logits = model.lm_head(h).float()
    return F.cross_entropy(logits[0], ids[-n_scored:], reduction="sum").item()


def same_targets_perplexity(model, split, windows, length, target, rope_scaling=None, device="cpu"):
    """(perplexity, scored target ids as a list per window) at one context length."""
    total, scored = 0.0, []
    for doc, end in windows:
        ids = torch.from_numpy(split.document(doc)[end - length - 1:end].astype("int64")).to(device)  # L + 1 tokens
        total += nll_of_last(model, ids, target, rope_scaling)
        scored.append(ids[-target:].tolist())
    return math.exp(total / (target * len(windows))), scored


def sliding_perplexity(model, split, docs, length, max_len, stride=512, rope_scaling=None, device="cpu"):
    """(perplexity, tokens scored): the paper's sliding window over documents truncated to max_len."""
    total, count = 0.0, 0
    for doc in docs:
        ids = torch.from_numpy(split.document(doc)[:max_len + 1].astype("int64")).to(device)
        n, prev_end = len(ids) - 1, 0  # n predictions: token t + 1 from tokens 0..t
        for begin in range(0, n, stride):
            end = min(begin + length, n)
            total += nll_of_last(model, ids[begin:end + 1], end - prev_end, rope_scaling)
            count += end - prev_end
            prev_end = end
            if end == n:
                break
    return math.exp(total / count), count


def passkey_parts(tok, key):
    return (tok.encode(PASSKEY_TASK), tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key. "),
            tok.encode(PASSKEY_QUESTION))


def passkey_min_length(tok):
    """Tokens of the fixed passkey text: a shorter length has no room for it."""
    return sum(map(len, passkey_parts(tok, "12345")))


def build_passkey(tok, length, depth, key):
    """(token ids of exactly `length` tokens, index of the first token of the key sentence, answer ids)
    with the key sentence at fraction `depth` of the filler."""
    head, info, question = passkey_parts(tok, key)
    n_filler = length - len(head) - len(info) - len(question)
    if n_filler < 0:
        raise UserError(f"passkey length {length} is shorter than its fixed text ({length - n_filler} tokens)")
    one = tok.encode(PASSKEY_FILLER)
    filler = (one * (n_filler // len(one) + 1))[:n_filler]
    cut = round(depth * n_filler)
    ids = head + filler[:cut] + info + filler[cut:] + question
    return ids, len(head) + cut, tok.encode(f" {key}")


@torch.no_grad()
def passkey_accuracy(model, tok, length, trials, rope_scaling=None, seed=0, device="cpu"):
    """Fraction of trials whose key (random 5 digits at a random depth) is decoded greedily."""
    rng = random.Random(seed * 1_000_003 + length)
    hits = 0
    for _ in range(trials):
        key = f"{rng.randint(10000, 99999)}"
        ids, _, answer = build_passkey(tok, length, rng.random(), key)
        out = model.generate(torch.tensor([ids], device=device), len(answer), temperature=0, rope_scaling=rope_scaling)
        hits += tok.decode(out[0, len(ids):].tolist()).strip() == key
    return hits / trials

# -----------------------------------------------------------------------------------------------
# Tables, files and the plot.

COLUMNS = ("checkpoint", "attention", "corpus", "scaling", "protocol", "length", "perplexity", "targets",
           "passkey_accuracy", "passkey_trials")


def row_label(r):
    return f"{r['checkpoint']} ({r['attention']}, {r['scaling']})"


def markdown_table(rows, key, fmt):
    """One line per (checkpoint, scaling), one column per length, of rows[key]."""
    lengths = sorted({r["length"] for r in rows})
    labels = list(dict.fromkeys(row_label(r) for r in rows))
    cell = {(row_label(r), r["length"]): r[key] for r in rows}
    out = ["| model | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for lab in labels:
        vals = [cell.get((lab, n)) for n in lengths]
        out.append(f"| {lab} | " + " | ".join("" if v is None else fmt(v) for v in vals) + " |")
    return "\n".join(out)


def write_outputs(rows, meta, out_dir, log=print):
    """results.json (meta + rows), results.csv (COLUMNS) and, with matplotlib, results.png."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "columns": COLUMNS, "results": rows}, f, indent=1)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({k: r.get(k) for k in COLUMNS} for r in rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    has_passkey = any(r.get("passkey_accuracy") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_passkey else 1, figsize=(13 if has_passkey else 7, 4.5), squeeze=False)
    for lab in dict.fromkeys(row_label(r) for r in rows):
        mine = sorted((r for r in rows if row_label(r) == lab), key=lambda r: r["length"])
        style = "--" if "rope" in lab.split("(")[1].split(",")[0] else "-"
        axes[0][0].plot([r["length"] for r in mine], [r["perplexity"] for r in mine], style, marker="o", label=lab)
        if has_passkey:
            axes[0][1].plot([r["length"] for r in mine], [r["passkey_accuracy"] for r in mine], style, marker="o", label=lab)
    ax = axes[0][0]
    ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="perplexity",
           title=f"perplexity vs context ({meta.get('protocol')}, trained at {meta.get('train_len')})")
    ax.axvline(meta.get("train_len", 512), color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=7)
    if has_passkey:
        axes[0][1].set(xscale="log", ylim=(-0.05, 1.05), xlabel="context length (tokens)", ylabel="accuracy",
                       title="passkey retrieval")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 3, 5)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for a in axes[0]:
        a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        a.set_xticks(sorted({r["length"] for r in rows}), [f"{n // 1024}K" if n >= 1024 else str(n)
                                                            for n in sorted({r["length"] for r in rows})])
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "results.png"), dpi=120)
    plt.close(fig)
