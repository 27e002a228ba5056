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

import numpy as np
import torch
import torch.nn.functional as F

from .common import method_name
from .errors import UserError

PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


def pick_windows(split, max_len, target, count):
    """Up to `count` windows [(document index, end)] in validation documents of at least max_len + 1 tokens:
    dealt to the documents in turn, and spread evenly over each document's possible ends (max_len + 1 to
    its last token), so they sample its whole length. Every length scores the tokens [end - target, end)."""
    lengths = [int(n) - 1 for n in split.doc_tokens]  # without the end-of-text token
    eligible = sorted((i for i, n in enumerate(lengths) if n >= max_len + 1), key=lambda i: -lengths[i])
    if not eligible:
        longest = max(range(len(lengths)), key=lambda i: lengths[i])
        raise UserError(f"length {max_len:,} needs a validation document of at least {max_len + 1:,} tokens; the "
                        f"longest is {split.names[longest]!r} with {lengths[longest]:,}: use shorter --lengths")
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
        ids = torch.from_numpy(split.document(doc)[end - length - 1:end].astype("int64")).to(device)  # L + 1 tokens
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
def passkey_accuracy(model, tok, length, trials, scaling=None, seed=0, device="cpu"):
    """Fraction of trials whose key (random 5 digits at a random depth) is decoded greedily."""
    rng = random.Random(seed * 1_000_003 + length)
    hits = 0
    for _ in range(trials):
        key = f"{rng.randint(10000, 99999)}"
        ids, _, answer = build_passkey(tok, length, rng.random(), key)
        out = model.generate(torch.tensor([ids], device=device), len(answer), temperature=0, scaling=scaling)
        hits += tok.decode(out[0, len(ids):].tolist()).strip() == key
    return hits / trials

# -----------------------------------------------------------------------------------------------
# Tables, files and the plot.

COLUMNS = ("checkpoint", "attention", "attn_scale", "corpus", "tokenizer", "scaling", "protocol", "length",
           "perplexity", "perplexity_lo", "perplexity_hi", "units", "targets", "unit_nll", "passkey_accuracy",
           "passkey_lo", "passkey_hi", "passkey_trials", "note")
# perplexity_lo/hi: 95% bootstrap interval over the scored units (same-targets: windows; sliding: documents);
# unit_nll: each unit's mean negative log-likelihood (nats per token), space-separated in the CSV;
# passkey_lo/hi: 95% Wilson interval; note: why a cell holds no number, or what it repeats.


def method(r):
    return method_name(r["attention"], r.get("attn_scale"))


def row_label(r):
    return f"{r['checkpoint']} ({method(r)}, {r['scaling']})"


def fmt_cell(r, key):
    """"5.02 (4.81-5.24)", the value and its interval, or the note where there is no value."""
    v = r.get(key)
    if v is None:
        return r.get("note") or ""
    lo, hi = (r.get("perplexity_lo"), r.get("perplexity_hi")) if key == "perplexity" else (r.get("passkey_lo"), r.get("passkey_hi"))
    return f"{v:.2f}" + (f" ({lo:.2f}-{hi:.2f})" if lo is not None else "")


def markdown_table(rows, key):
    """One line per (checkpoint, scaling), one column per length, of rows[key] with its 95% interval."""
    lengths = sorted({r["length"] for r in rows})
    labels = list(dict.fromkeys(row_label(r) for r in rows))
    cell = {(row_label(r), r["length"]): r for r in rows}
    out = ["| model | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for lab in labels:
        out.append(f"| {lab} | " + " | ".join(fmt_cell(cell[lab, n], key) if (lab, n) in cell else ""
                                              for n in lengths) + " |")
    return "\n".join(out)


def write_outputs(rows, meta, out_dir, plot=True, log=print):
    """results.json (meta + rows), results.csv (COLUMNS) and, with plot and matplotlib, results.png."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "columns": COLUMNS, "results": rows}, f, indent=1)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: " ".join(f"{x:.6f}" for x in r[k]) if k == "unit_nll" and r.get(k) else r.get(k)
                        for k in COLUMNS})
    if plot:
        plot_results(rows, meta, os.path.join(out_dir, "results.png"), log)


def pyplot(log):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return None


def length_axis(ax, lengths):
    import matplotlib.ticker
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(lengths, [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])


def log_y_axis(ax):
    import matplotlib.ticker
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 3, 5)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


METHODS = ["coca", "rope", "alibi", "coca-slack", "coca+ssmax", "rope+ssmax", "alibi+ssmax", "coca-slack+ssmax"]


def run_styles(runs):
    """{(method, run): (colour, line style)}: one colour per method (the same in every plot), a line
    style per run of that method."""
    styles = {}
    for m, run in dict.fromkeys(runs):
        colour = f"C{METHODS.index(m)}" if m in METHODS else "k"
        k = sum(1 for mm, _ in styles if mm == m)
        styles[(m, run)] = (colour, ["-", "--", ":", "-."][k % 4])
    return styles


def plot_results(rows, meta, path, log=print):
    """Perplexity against length, one panel per scaling, one line per checkpoint with its 95% band
    (a colour per method, a line style per checkpoint); passkey accuracy in a last panel."""
    plt = pyplot(log)
    if plt is None:
        return
    rows = [r for r in rows if r.get("perplexity") is not None or r.get("passkey_accuracy") is not None]
    scalings = list(dict.fromkeys(r["scaling"] for r in rows))
    styles = run_styles((method(r), r["checkpoint"]) for r in rows)
    has_passkey = any(r.get("passkey_accuracy") is not None for r in rows)
    panels = len(scalings) + has_passkey
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels + 1, 4.6), squeeze=False)
    ppl_axes = axes[0][:len(scalings)]
    for ax, scaling in zip(ppl_axes, scalings):
        for (m, ckpt), (colour, style) in styles.items():
            mine = sorted((r for r in rows if r["checkpoint"] == ckpt and r["scaling"] == scaling
                           and r.get("perplexity") is not None), key=lambda r: r["length"])
            if not mine:
                continue
            n = [r["length"] for r in mine]
            ax.plot(n, [r["perplexity"] for r in mine], style, color=colour, marker="o", ms=3, label=f"{ckpt} ({m})")
            if all(r.get("perplexity_lo") is not None for r in mine):
                ax.fill_between(n, [r["perplexity_lo"] for r in mine], [r["perplexity_hi"] for r in mine],
                                color=colour, alpha=0.12, lw=0)
        ax.set(xlabel="context length (tokens)", title=f"scaling: {scaling}")
        ax.axvline(meta.get("train_len", 512), color="grey", lw=0.8, ls=":")
    ppl_axes[0].set_ylabel(f"perplexity, {meta.get('protocol')} (95% band)")
    if has_passkey:
        ax = axes[0][-1]
        for r0 in dict.fromkeys((r["checkpoint"], r["scaling"]) for r in rows):
            pk = sorted((r for r in rows if (r["checkpoint"], r["scaling"]) == r0
                         and r.get("passkey_accuracy") is not None), key=lambda r: r["length"])
            if not pk:
                continue
            colour, style = styles[(method(pk[0]), r0[0])]
            acc = [r["passkey_accuracy"] for r in pk]
            err = [[a - (r["passkey_lo"] or a) for a, r in zip(acc, pk)], [(r["passkey_hi"] or a) - a for a, r in zip(acc, pk)]]
            ax.errorbar([r["length"] for r in pk], acc, yerr=err, fmt=style, color=colour, marker="o", ms=3,
                        capsize=2, label=f"{r0[0]} ({r0[1]})")
        ax.set(ylim=(-0.05, 1.05), xlabel="context length (tokens)", ylabel="accuracy (95% Wilson)",
               title="passkey retrieval")
        ax.legend(fontsize=6)
    lengths = sorted({r["length"] for r in rows})
    top = max((r.get("perplexity_hi") or r.get("perplexity") or 0) for r in rows)
    low = min((r.get("perplexity_lo") or r.get("perplexity") or top) for r in rows)
    for ax in ppl_axes:
        log_y_axis(ax)
        ax.set_ylim(low / 1.1, top * 1.1)  # one scale for every panel, so they compare at a glance
    for ax in axes[0]:
        length_axis(ax, lengths)
    ppl_axes[0].legend(fontsize=6)
    fig.suptitle(f"trained at {meta.get('train_len')}; the same target tokens at every length" if
                 meta.get("protocol") == "same-targets" else f"trained at {meta.get('train_len')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_length_curves(run_dir):
    """[(iter, {length: perplexity})] from the eval records of a run's log.jsonl (--eval_lengths)."""
    path = os.path.join(run_dir, "log.jsonl") if os.path.isdir(run_dir) else run_dir
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"--curves: cannot read {path} ({e})") from None
    points = [(r["iter"], {int(k): v for k, v in r["ppl_at_length"].items()}) for r in records
              if r.get("event") == "eval" and r.get("ppl_at_length")]
    if not points:
        raise UserError(f"--curves: {path} has no tracked perplexities; train with --eval_lengths=512,2K,8K")
    start = next((r for r in records if r.get("event") == "start"), {}).get("config", {})
    name = method_name(start.get("attention", "?"), start.get("attn_scale"))
    return f"{run_dir} ({name}, seed {start.get('seed', '?')})", name, points


def plot_training_curves(run_dirs, path, log=print):
    """One panel per tracked length: perplexity against training step, one line per run; the last
    panel is the longest length's perplexity over the shortest's."""
    runs = [read_length_curves(d) for d in run_dirs]
    plt = pyplot(log)
    if plt is None:
        return runs
    lengths = sorted({n for _, _, pts in runs for _, ppl in pts for n in ppl})
    fig, axes = plt.subplots(1, len(lengths) + 1, figsize=(4.2 * (len(lengths) + 1), 4.2), squeeze=False)
    styles = run_styles((m, label) for label, m, _ in runs)
    for label, m, pts in runs:
        colour, style = styles[(m, label)]
        kw = dict(ls=style, color=colour, marker="o", ms=2, label=label)
        for ax, n in zip(axes[0], lengths):
            xs = [(i, p[n]) for i, p in pts if n in p]
            ax.plot([x for x, _ in xs], [y for _, y in xs], **kw)
        ratio = [(i, p[lengths[-1]] / p[lengths[0]]) for i, p in pts if lengths[0] in p and lengths[-1] in p]
        axes[0][-1].plot([x for x, _ in ratio], [y for _, y in ratio], **kw)
    for ax, n in zip(axes[0], lengths):
        ax.set(title=f"perplexity at {n:,} tokens", xlabel="training step")
        log_y_axis(ax)
    axes[0][-1].set(title=f"{lengths[-1]:,} over {lengths[0]:,}", xlabel="training step", ylabel="ratio")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return runs
