"""Reports: Markdown tables with intervals, results.json / results.csv (written atomically), the perplexity
plot, the passkey heatmaps (length across, key depth down) and training curves; and a command for reports
over results already written:

    python -m nanococa.report merge eval-rope eval-coca --out_dir results/passkey-cpu   # one table of several
    python -m nanococa.report curves out-pk-rope out-pk-coca --out_dir results/passkey-cpu   # against step
    python -m nanococa.report runs rope-s* coca-s[0-9]* --out_dir results/ladder-cpu   # seeded passkey runs
    python -m nanococa.report seeds results/ladder-cpu --out_dir results/ladder-cpu   # arms over their seeds

merge joins evaluations of one plan (corpus, protocol, windows, lengths; eval_length.py run side by side),
checking every file it reads; curves plots what runs logged at each evaluation (--eval_lengths,
--passkey_mix); runs says when each seeded run learned passkey retrieval, k of n per arm, with exact
tests; seeds compares the arms' perplexity over their seeds (the grid merged into the same folder).
Plotting needs the optional matplotlib; training never imports this module."""
import csv
import io
import itertools
import json
import math
import os
import sys

from .common import atomic_write, file_lock, method_name
from .errors import ArgumentParser, UserError, run_script

COLUMNS = ("checkpoint", "attention", "attn_scale", "corpus", "tokenizer", "scaling", "protocol", "length",
           "perplexity", "perplexity_lo", "perplexity_hi", "units", "targets", "unit_nll", "passkey_accuracy",
           "passkey_lo", "passkey_hi", "passkey_trials", "passkey_depth_hits", "passkey_depth_trials",
           "passkey_answer_nll", "note")
# perplexity_lo/hi: 95% bootstrap interval over the scored units (same-targets: windows; sliding: documents);
# unit_nll: each unit's mean negative log-likelihood (nats per token), space-separated in the CSV;
# passkey_lo/hi: 95% Wilson interval; passkey_depth_hits/trials: per depth bucket (0-10%, 10-20%, ... of the
# filler before the key), space-separated in the CSV; passkey_answer_nll: mean NLL of each answer token;
# note: why a cell holds no number, or what it repeats.
LISTS = ("unit_nll", "passkey_depth_hits", "passkey_depth_trials", "passkey_answer_nll")


def method(r):
    return method_name(r["attention"], r.get("attn_scale"))


def row_label(r):
    return f"{r['checkpoint']} ({method(r)}, {r['scaling']})"


def fmt_cell(r, key):
    """"5.02 (4.81-5.24)", the value and its interval, or "" where there is no value."""
    v = r.get(key)
    if v is None:
        return ""
    lo, hi = (r.get("perplexity_lo"), r.get("perplexity_hi")) if key == "perplexity" else \
        (r.get("passkey_lo"), r.get("passkey_hi"))
    return f"{v:.2f}" + (f" ({lo:.2f}-{hi:.2f})" if lo is not None else "")


def markdown_table(rows, key):
    """One line per (checkpoint, scaling), one column per length, of rows[key] with its 95% interval; a cell
    without a value says why in a numbered note under the table."""
    lengths = sorted({r["length"] for r in rows})
    labels = list(dict.fromkeys(row_label(r) for r in rows))
    cell = {(row_label(r), r["length"]): r for r in rows}
    notes = {}

    def text(r):
        if r.get(key) is None and r.get("note"):
            return f"- [{notes.setdefault(r['note'], len(notes) + 1)}]"
        return fmt_cell(r, key)

    out = ["| model | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for lab in labels:
        cells = (text(cell[lab, n]) if (lab, n) in cell else "" for n in lengths)
        out.append(f"| {lab} | " + " | ".join(cells) + " |")
    if notes:
        out += [""] + [f"[{i}] {note}" for note, i in notes.items()]
    return "\n".join(out)


def write_outputs(rows, meta, out_dir, plot=True, log=print):
    """results.json (meta + rows), results.csv (COLUMNS), each replaced whole or not at all; with plot and
    matplotlib, results.png and (with passkey rows) passkey.png. Returns the paths written."""
    doc = json.dumps({"meta": meta, "columns": COLUMNS, "results": rows}, indent=1)
    table = io.StringIO()
    w = csv.DictWriter(table, fieldnames=COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow({k: " ".join(f"{x:.6f}" if isinstance(x, float) else str(x) for x in r[k])
                    if k in LISTS and r.get(k) else r.get(k) for k in COLUMNS})
    written = []
    for name, text in (("results.json", doc), ("results.csv", table.getvalue())):
        path = os.path.join(out_dir, name)
        atomic_write(path, lambda f, text=text: f.write(text), mode="w", what="results file")
        written.append(path)
    if plot:
        for name, draw in (("results.png", plot_results), ("passkey.png", plot_passkey_heatmaps)):
            path = os.path.join(out_dir, name)
            if draw(rows, meta, path, log):
                written.append(path)
    return written


def pyplot(log):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return None


def save_figure(fig, plt, path):
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"), what="plot")
    plt.close(fig)
    return True


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


METHODS = ["coca", "rope", "alibi", "coca-slack", "coca+ssmax", "rope+ssmax", "alibi+ssmax",
           "coca-slack+ssmax"]


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
    rows = [r for r in rows if r.get("perplexity") is not None or r.get("passkey_accuracy") is not None]
    plt = pyplot(log) if rows else None
    if plt is None:
        return False
    scalings = list(dict.fromkeys(r["scaling"] for r in rows))
    styles = run_styles((method(r), r["checkpoint"]) for r in rows)
    has_passkey = any(r.get("passkey_accuracy") is not None for r in rows)
    panels = len(scalings) + has_passkey
    cols = min(panels, 3)
    fig, grid = plt.subplots(-(-panels // cols), cols, figsize=(5 * cols, 4.2 * -(-panels // cols)),
                             squeeze=False)
    axes, spare = list(grid.flat[:panels]), list(grid.flat[panels:])  # a grid, read in order
    ppl_axes = axes[:len(scalings)]
    for ax, scaling in zip(ppl_axes, scalings):
        for (m, ckpt), (colour, style) in styles.items():
            mine = sorted((r for r in rows if r["checkpoint"] == ckpt and r["scaling"] == scaling
                           and r.get("perplexity") is not None), key=lambda r: r["length"])
            if not mine:
                continue
            n = [r["length"] for r in mine]
            ax.plot(n, [r["perplexity"] for r in mine], style, color=colour, marker="o", ms=3,
                    label=f"{ckpt} ({m})")
            if all(r.get("perplexity_lo") is not None for r in mine):
                ax.fill_between(n, [r["perplexity_lo"] for r in mine], [r["perplexity_hi"] for r in mine],
                                color=colour, alpha=0.12, lw=0)
        ax.set(xlabel="context length (tokens)", title=f"scaling: {scaling}")
        ax.axvline(meta.get("train_len", 512), color="grey", lw=0.8, ls=":")
    ppl_axes[0].set_ylabel(f"perplexity, {meta.get('protocol')} (95% band)")
    if has_passkey:
        passkey_panel(axes[-1], rows, styles)
    lengths = sorted({r["length"] for r in rows})
    values = [v for r in rows for v in (r.get("perplexity_lo"), r.get("perplexity"), r.get("perplexity_hi"))
              if v is not None]
    for ax in ppl_axes:
        log_y_axis(ax)
        if values:
            ax.set_ylim(min(values) / 1.1, max(values) * 1.1)  # one scale for every panel, compared at sight
    for ax in axes:
        length_axis(ax, lengths)
    for ax in spare:
        ax.remove()
    title = f"trained at {meta.get('train_len')}"
    same = meta.get("protocol") == "same-targets"
    fig.suptitle(title + ("; the same target tokens at every length" if same else ""), fontsize=10)
    legend_below(fig, axes, cols)
    return save_figure(fig, plt, path)


def passkey_panel(ax, rows, styles):
    """Passkey accuracy against length, one line per (checkpoint, scaling), with 95% Wilson bars."""
    for r0 in dict.fromkeys((r["checkpoint"], r["scaling"]) for r in rows):
        pk = sorted((r for r in rows if (r["checkpoint"], r["scaling"]) == r0
                     and r.get("passkey_accuracy") is not None), key=lambda r: r["length"])
        if not pk:
            continue
        colour, style = styles[(method(pk[0]), r0[0])]
        acc = [r["passkey_accuracy"] for r in pk]
        err = [[a - r["passkey_lo"] for a, r in zip(acc, pk)], [r["passkey_hi"] - a for a, r in zip(acc, pk)]]
        ax.errorbar([r["length"] for r in pk], acc, yerr=err, fmt=style, color=colour, marker="o", ms=3,
                    capsize=2, label=f"{r0[0]} ({r0[1]})")
    ax.set(ylim=(-0.05, 1.05), xlabel="context length (tokens)", ylabel="accuracy (95% Wilson)",
           title="passkey retrieval")


def legend_below(fig, axes, cols):
    """Every line once, in one legend below the panels (many lines would cover them), and the layout."""
    legend = {}
    for ax in axes:
        legend.update({label: h for h, label in zip(*ax.get_legend_handles_labels()) if label not in legend})
    height = 0.2 * -(-len(legend) // (2 * cols)) + 0.3  # inches added below the grid for the legend
    fig.set_figheight(fig.get_figheight() + height)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=2 * cols, fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, height / fig.get_figheight(), 1, 1))


def plot_passkey_heatmaps(rows, meta, path, log=print):
    """The needle-in-a-haystack picture: one heatmap per (checkpoint, scaling), context length across, depth
    of the key in the filler down, colour = accuracy in that cell (its trials printed in the title)."""
    rows = [r for r in rows if r.get("passkey_depth_trials")]
    plt = pyplot(log) if rows else None
    if plt is None:
        return False
    pairs = list(dict.fromkeys((r["checkpoint"], r["scaling"]) for r in rows))
    ckpts = list(dict.fromkeys(c for c, _ in pairs))
    scalings = list(dict.fromkeys(s for _, s in pairs))
    lengths = sorted({r["length"] for r in rows})
    size = (2.5 * len(scalings) + 1.5, 2.3 * len(ckpts) + 0.8)
    fig, axes = plt.subplots(len(ckpts), len(scalings), figsize=size, squeeze=False, layout="constrained")
    image = None
    for i, ckpt in enumerate(ckpts):
        for j, scaling in enumerate(scalings):
            ax = axes[i][j]
            cells = {r["length"]: r for r in rows if (r["checkpoint"], r["scaling"]) == (ckpt, scaling)}
            if not cells:
                ax.axis("off")
                continue
            buckets = len(next(iter(cells.values()))["passkey_depth_trials"])
            grid = [[(cells[n]["passkey_depth_hits"][b] / cells[n]["passkey_depth_trials"][b])
                     if n in cells and cells[n]["passkey_depth_trials"][b] else float("nan") for n in lengths]
                    for b in range(buckets)]
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", interpolation="nearest")
            ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths],
                          fontsize=6)
            ax.set_yticks([0, buckets - 1], [f"0-{100 // buckets}%", f"{100 - 100 // buckets}-100%"],
                          fontsize=6)
            trials = sum(next(iter(cells.values()))["passkey_depth_trials"])
            method_of = method(next(iter(cells.values())))
            ax.set_title(f"{os.path.basename(str(ckpt).rstrip('/'))} ({method_of})\n{scaling}, {trials} "
                         "trials",
                         fontsize=7)
            if j == 0:
                ax.set_ylabel("key depth", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.6, label="passkey accuracy")
    title = f"passkey retrieval by context length and key depth (trained at {meta.get('train_len')})"
    fig.suptitle(title if len(scalings) > 1 else title.replace(" and key", "\nand key"), fontsize=9)
    return save_figure(fig, plt, path)


def read_length_curves(run_dir, log=print):
    """(label, method, corpus, [(iter, {length: perplexity}, passkey accuracy or None)]) from the evaluation
    records of a run's log.jsonl (--eval_lengths, --passkey_mix). Lines that are not JSON records of the
    expected shape are skipped with a warning naming them."""
    path = os.path.join(run_dir, "log.jsonl") if os.path.isdir(run_dir) else run_dir
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UserError(f"curves: cannot read {path} ({e.strerror or e})") from None
    records, points, skipped = [], [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            if not isinstance(r, dict):
                raise ValueError
            if r.get("event") == "eval" and (r.get("ppl_at_length") or r.get("passkey") is not None):
                ppl = {int(k): float(v) for k, v in (r.get("ppl_at_length") or {}).items()}
                points.append((int(r["iter"]), ppl,
                               None if r.get("passkey") is None else float(r["passkey"])))
            records.append(r)
        except (ValueError, TypeError, AttributeError, KeyError):
            skipped.append(i)
    if skipped:
        log(f"curves: {path}: skipped line(s) {', '.join(map(str, skipped[:10]))}"
            f"{' ...' if len(skipped) > 10 else ''}: not a log record")
    if not points:
        raise UserError(f"curves: {path} has no tracked perplexities or passkey accuracies; train with "
                        "--eval_lengths=512,2K,8K or --passkey_mix")
    start = next((r for r in records if r.get("event") == "start" and isinstance(r.get("config"), dict)), {})
    config = start.get("config", {})
    name = method_name(config.get("attention", "?"), config.get("attn_scale"))
    return f"{run_dir} ({name}, seed {config.get('seed', '?')})", name, config.get("corpus"), points


def plot_training_curves(run_dirs, path, log=print):
    """One panel per tracked length: perplexity against training step, one line per run; then the longest
    length's perplexity over the shortest's, and passkey accuracy at block_size where runs tracked it.
    Runs on different corpora are refused, as eval_length.py --ckpt refuses them."""
    runs = [read_length_curves(d, log) for d in run_dirs]
    corpora = {d: corpus for d, (_, _, corpus, _) in zip(run_dirs, runs)}
    if len(set(corpora.values())) > 1:
        listed = ", ".join(f"{d}: {c}" for d, c in corpora.items())
        raise UserError(f"curves: these runs trained on different corpora ({listed}); their perplexities do "
                        "not share a scale: plot them in separate calls")
    plt = pyplot(log)
    if plt is None:
        return runs, False
    lengths = sorted({n for *_, pts in runs for _, ppl, _ in pts for n in ppl})
    panels = [("ppl", n) for n in lengths] + ([("ratio", None)] if len(lengths) > 1 else []) \
        + ([("passkey", None)] if any(pk is not None for *_, pts in runs for *_, pk in pts) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    styles = run_styles((m, label) for label, m, _, _ in runs)
    for label, m, _, pts in runs:
        colour, style = styles[(m, label)]
        kw = dict(ls=style, color=colour, marker="o", ms=2, label=label)
        for ax, (kind, n) in zip(axes[0], panels):
            if kind == "ppl":
                xs = [(i, p[n]) for i, p, _ in pts if n in p]
            elif kind == "ratio":
                xs = [(i, p[lengths[-1]] / p[lengths[0]]) for i, p,
                      _ in pts if lengths[0] in p and lengths[-1] in p]
            else:
                xs = [(i, pk) for i, _, pk in pts if pk is not None]
            ax.plot([x for x, _ in xs], [y for _, y in xs], **kw)
    for ax, (kind, n) in zip(axes[0], panels):
        if kind == "ppl":
            ax.set(title=f"perplexity at {n:,} tokens", xlabel="training step")
            log_y_axis(ax)
        elif kind == "ratio":
            ax.set(title=f"{lengths[-1]:,} over {lengths[0]:,}", xlabel="training step", ylabel="ratio")
        else:
            ax.set(title="passkey accuracy at the training length", xlabel="training step",
                   ylim=(-0.05, 1.05))
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    return runs, save_figure(fig, plt, path)

# -----------------------------------------------------------------------------------------------
# Output folders, and the tables every command prints.


def check_out_dir(out_dir):
    """The results must have somewhere to go before any work starts."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test.{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--out_dir={out_dir} cannot be written ({e.strerror or e})") from None


def check_no_results(out_dir, names, overwrite):
    there = [n for n in names if os.path.lexists(os.path.join(out_dir, n))]
    if there and not overwrite:
        raise UserError(f"--out_dir={out_dir} already holds {', '.join(there)}: choose another --out_dir, "
                        "or replace them with --overwrite")


def show_and_write(rows, meta, out_dir, passkey_trials, log):
    """The tables on stdout (passkey's when it was measured), then every output file; returns rows."""
    print(f"\nPerplexity ({meta['protocol']}; lower is better; 95% interval over "
          f"{'windows' if meta['protocol'] == 'same-targets' else 'documents'} in parentheses)\n")
    print(markdown_table(rows, "perplexity"))
    if passkey_trials:
        print(f"\nPasskey accuracy ({passkey_trials} trials per length, 95% Wilson interval)\n")
        print(markdown_table(rows, "passkey_accuracy"))
    written = write_outputs(rows, meta, out_dir, log=log)
    print(f"\n# wrote {', '.join(written)}", file=sys.stderr)
    return rows

# -----------------------------------------------------------------------------------------------
# python -m nanococa.report: merge and curves.


def merge(folders, out_dir, log):
    """results.json of several evaluations of one plan (corpus, protocol, windows, lengths) as one table."""
    docs = [read_results(folder) for folder in folders]
    same = ("protocol", "lengths", "target", "corpus", "tokenizer", "windows", "seed")
    for folder, doc in zip(folders[1:], docs[1:]):
        differ = [k for k in same if doc["meta"].get(k) != docs[0]["meta"].get(k)]
        if differ:
            raise UserError(f"merge: {folder} was evaluated with another {', '.join(differ)} than "
                            f"{folders[0]}")
    with_passkey = [(folder, doc["meta"]) for folder,
                    doc in zip(folders, docs) if doc["meta"].get("passkey_trials")]
    for folder, m in with_passkey[1:]:  # one passkey plan too: a table heads every cell with one trial count
        differ = [k for k in ("passkey_trials",
                              "passkey_depth_buckets") if m.get(k) != with_passkey[0][1].get(k)]
        if differ:
            raise UserError(f"merge: {folder} measured passkey with another {', '.join(differ)} "
                            f"than {with_passkey[0][0]}")
    rows = [r for doc in docs for r in doc["results"]]
    meta = {**docs[0]["meta"], "checkpoints": [c for doc in docs for c in doc["meta"].get("checkpoints", [])],
            "merged_from": folders, "seconds": sum(doc["meta"].get("seconds") or 0 for doc in docs)}
    if with_passkey:
        lengths = {n for _, m in with_passkey for n in m.get("passkey_lengths") or m["lengths"]}
        meta.update({k: with_passkey[0][1].get(k) for k in ("passkey_trials", "passkey_depth_buckets")},
                    passkey_lengths=sorted(lengths))
    return show_and_write(rows, meta, out_dir, meta.get("passkey_trials") if with_passkey else 0, log)


def read_results(folder):
    """folder/results.json, checked: a dict with meta (a dict) and results (rows whose lengths are positive
    integers, perplexities positive finite numbers, accuracies in [0, 1]); else one UserError naming it."""
    path = os.path.join(folder, "results.json")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"merge: cannot read {path} ({e})") from None
    if not (isinstance(doc, dict) and isinstance(doc.get("meta"), dict)
            and isinstance(doc.get("results"), list)):
        raise UserError(f"merge: {path} is not an evaluation's results (a dict with meta and results)")
    for i, r in enumerate(doc["results"]):
        problem = row_problem(r)
        if problem:
            raise UserError(f"merge: {path}, row {i + 1}: {problem}")
    return doc


def row_problem(r):
    """What is wrong with one results row, or None."""
    if not isinstance(r, dict) or not all(k in r for k in ("checkpoint", "scaling", "length", "attention")):
        return "not a row (it needs checkpoint, attention, scaling and length)"
    if not (isinstance(r["length"], int) and r["length"] > 0):
        return f"length {r['length']!r} is not a positive integer"
    for key, low, high in (("perplexity", 1.0, math.inf), ("perplexity_lo", 1.0, math.inf),
                           ("perplexity_hi", 1.0, math.inf), ("passkey_accuracy", 0.0, 1.0)):
        v = r.get(key)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                  and low <= v <= high):
            return f"{key} is {v!r}, not a number in [{low}, {high}]"
    return None


def curves(run_dirs, out_dir, log):
    """Perplexity and passkey accuracy against training step from these runs' log.jsonl, as curves.png."""
    path = os.path.join(out_dir, "curves.png")
    runs, plotted = plot_training_curves(run_dirs, path, log=log)
    for label, _, _, points in runs:
        step, ppl, pk = points[-1]
        print(f"{label}: step {step}: " + ", ".join([f"ppl@{n:,} {p:.2f}" for n, p in sorted(ppl.items())]
                                                    + ([f"passkey {pk:.2f}"] if pk is not None else [])))
    if plotted:
        print(f"# wrote {path}", file=sys.stderr)
    return runs


# -----------------------------------------------------------------------------------------------
# Seeded runs: when each learned passkey retrieval, k of n per arm, exact tests between arms.


def read_run(run_dir):
    """One run's log.jsonl as dict(run, arm, seed, evals=[(iter, passkey, [answer-token NLL], val_loss)],
    steps, seconds, config); a log without passkey evaluations is a UserError naming it."""
    path = os.path.join(run_dir, "log.jsonl") if os.path.isdir(run_dir) else run_dir
    try:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"runs: cannot read {path} ({e})") from None
    starts = [r for r in records if isinstance(r, dict) and r.get("event") == "start"]
    evals = [(r["iter"], r["passkey"], r.get("passkey_answer_nll") or [], r.get("val_loss"))
             for r in records
             if isinstance(r, dict) and r.get("event") == "eval" and r.get("passkey") is not None]
    if not starts or not evals:
        raise UserError(f"runs: {path} has no passkey evaluations (train with --passkey_mix)")
    config = starts[0].get("config", {})
    ends = [r for r in records if isinstance(r, dict) and r.get("event") == "end"]
    label = method_name(config.get("attention", "?"), config.get("attn_scale"))
    if config.get("positions", "contiguous") != "contiguous":
        label += f", {config['positions']}"
    if config.get("n_head") not in (None, 4):
        label += f", {config['n_head']} heads"
    return dict(run=str(run_dir).rstrip("/"), arm=label, seed=config.get("seed"),
                max_iters=config.get("max_iters"),
                schedule=config.get("lr_decay_iters") or config.get("max_iters"),
                evals=sorted(evals), steps=evals[-1][0] if not ends else ends[-1].get("iters"),
                seconds=ends[-1]["run_seconds"] if ends and "run_seconds" in ends[-1] else
                sum(r.get("seconds") or 0 for r in ends), config=config)  # older logs: each part's own


def fisher_exact(a, b, c, d):
    """Two-sided p of Fisher's exact test on the 2 x 2 table [[a, b], [c, d]] (the probabilities of every
    table with the same margins that is no more likely than the one observed, summed)."""
    row1, col1, n = a + b, a + c, a + b + c + d

    def prob(x):
        return math.comb(col1, x) * math.comb(n - col1, row1 - x) / math.comb(n, row1)
    observed = prob(a)
    lo, hi = max(0, row1 - (n - col1)), min(row1, col1)
    return min(1.0, sum(prob(x) for x in range(lo, hi + 1) if prob(x) <= observed * (1 + 1e-9)))


def summarize_runs(runs, threshold, by):
    """Per run: the first evaluation with passkey accuracy >= threshold (None: not reached) and the last
    validation loss; per arm: learned by step `by` as k of n, and the crossing steps."""
    for r in runs:
        r["crossing"] = next((i for i, pk, _, _ in r["evals"] if pk >= threshold), None)
        r["learned"] = r["crossing"] is not None and r["crossing"] <= by
        r["final_val_loss"] = r["evals"][-1][3]
        r["final_passkey"] = r["evals"][-1][1]
    arms = {}
    for r in runs:
        arms.setdefault(r["arm"], []).append(r)
    return arms


def runs_report(run_dirs, out_dir, threshold, by, log):
    """The seeded-runs tables on stdout, runs.csv, runs.json (with every pairwise exact test) and
    digits.png (passkey accuracy and the loss of each answer token against training step, per arm)."""
    runs = [read_run(d) for d in run_dirs]
    schedules = {}  # one method run with two schedules (6,000 and 12,000 steps) is two arms, not one
    for r in runs:
        schedules.setdefault(r["arm"], set()).add(r["schedule"])
    for r in runs:
        if len(schedules[r["arm"]]) > 1:
            r["arm"] += f", {r['schedule']:,}-step schedule"
    seen = {}
    for r in runs:  # a run named twice (a glob like coca-s* also matches coca-signed-s*) would inflate n
        other = seen.setdefault((r["arm"], r["seed"]), r)
        if other is not r:
            raise UserError(f"runs: {other['run']} and {r['run']} are the same arm and seed "
                            f"({r['arm']}, seed {r['seed']}); give each run once")
    arms = summarize_runs(runs, threshold, by)
    print(f"\nRuns: the first evaluation at which passkey accuracy reached {threshold} (crossing), "
          "the last validation loss\n")
    print("| arm | seed | crossing | passkey at the end | steps | val loss |\n|---|---|---|---|---|---|")
    for arm, members in arms.items():
        for r in sorted(members, key=lambda r: str(r["seed"])):
            crossing = f"{r['crossing']:,}" if r["crossing"] is not None else f"not by {r['steps']:,}"
            print(f"| {arm} | {r['seed']} | {crossing} | {r['final_passkey']:.2f} | {r['steps']:,} | "
                  f"{r['final_val_loss']:.4f} |")
    print(f"\nLearned by step {by:,} (accuracy >= {threshold}), k of n\n")
    print("| arm | k / n | crossing steps |\n|---|---|---|")
    for arm, members in arms.items():
        k = sum(r["learned"] for r in members)
        steps = sorted(r["crossing"] for r in members if r["crossing"] is not None)
        print(f"| {arm} | {k} / {len(members)} | {', '.join(f'{s:,}' for s in steps) or '-'} |")
    tests = []
    names = list(arms)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            a, b = sum(r["learned"] for r in arms[x]), len(arms[x])
            c, d = sum(r["learned"] for r in arms[y]), len(arms[y])
            tests.append(dict(arms=[x, y], table=[[a, b - a], [c, d - c]],
                              p=fisher_exact(a, b - a, c, d - c)))
    print("\nFisher's exact test (two-sided), learned against not, each pair of arms\n")
    print("| arms | k / n | p |\n|---|---|---|")
    for t in tests:
        (a, b), (c, d) = t["table"]
        print(f"| {t['arms'][0]} vs {t['arms'][1]} | {a}/{a + b} vs {c}/{c + d} | {t['p']:.3g} |")
    doc = dict(threshold=threshold, by=by, tests=tests,
               runs=[{k: v for k, v in r.items() if k != "config"}
                     | {"positions": r["config"].get("positions")}
                     for r in runs])
    atomic_write(os.path.join(out_dir, "runs.json"), lambda f: f.write(json.dumps(doc, indent=1)), mode="w",
                 what="runs report")
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow(["arm", "seed", "run", "crossing", "learned_by", "final_passkey", "steps", "final_val_loss",
                "seconds"])
    for r in runs:
        w.writerow([r["arm"], r["seed"], r["run"], r["crossing"] if r["crossing"] is not None else "", by,
                    r["final_passkey"], r["steps"], r["final_val_loss"], round(r["seconds"], 1)])
    atomic_write(os.path.join(out_dir, "runs.csv"), lambda f: f.write(table.getvalue()), mode="w",
                 what="runs report")
    plot_digit_losses(arms, os.path.join(out_dir, "digits.png"), log)
    return doc


def rank_sum_exact(xs, ys):
    """Two-sided p of the exact Wilcoxon-Mann-Whitney test (ties take their mean rank): the share of the
    ways to split the pooled values into groups of len(xs) and len(ys) whose rank sum is at least as far
    from its mean as the one observed. For seeds: 4 against 4 fully separated gives 2/70."""
    pooled = xs + ys
    ranks = [sum(u < v for u in pooled) + (pooled.count(v) + 1) / 2 for v in pooled]
    mean = len(xs) * (len(pooled) + 1) / 2
    observed = abs(sum(ranks[:len(xs)]) - mean)
    splits = list(itertools.combinations(ranks, len(xs)))
    return sum(abs(sum(c) - mean) >= observed - 1e-9 for c in splits) / len(splits)


def seeds_report(folder, scaling, out_dir):
    """Per length, each arm's perplexity over its seeds (folder's runs.json names the arms, its results.json
    the grid) and the exact rank-sum test between each pair of arms, on stdout and as seeds.json."""
    try:
        with open(os.path.join(folder, "runs.json")) as f:
            arm_of = {os.path.basename(r["run"]): (r["arm"], r["seed"]) for r in json.load(f)["runs"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"seeds: cannot read {folder}/runs.json (write it with `report runs`): {e}") from None
    rows = [r for r in read_results(folder)["results"]
            if r["scaling"] == scaling and r["checkpoint"] in arm_of]
    if not rows:
        raise UserError(f"seeds: {folder}/results.json has no {scaling!r} rows of the runs in its runs.json")
    order = {name: i for i, name in enumerate(arm_of)}
    by_length = {}
    for r in sorted(rows, key=lambda r: (r["length"], order[r["checkpoint"]])):
        arm, seed = arm_of[r["checkpoint"]]
        entry = by_length.setdefault(r["length"], {}).setdefault(arm, {"seeds": [], "perplexity": []})
        entry["seeds"].append(seed)
        entry["perplexity"].append(r["perplexity"])
    out = [dict(length=length, arms=arms,
                tests=[dict(arms=[x, y], p=rank_sum_exact(arms[x]["perplexity"], arms[y]["perplexity"]))
                       for x, y in itertools.combinations(arms, 2)])
           for length, arms in by_length.items()]
    print(f"\nPerplexity per byte, scaling {scaling}, each seed (in runs.json's order)\n")
    names = list(dict.fromkeys(a for a, _ in arm_of.values()))
    print("| length | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for entry in out:
        cells = [", ".join(f"{v:.2f}" for v in entry["arms"].get(a, {}).get("perplexity", [])) or "-"
                 for a in names]
        print(f"| {entry['length']:,} | " + " | ".join(cells) + " |")
    print("\nExact rank-sum test (two-sided) between the arms' seeds, each length and pair\n")
    print("| length | arms | n | p |\n|---|---|---|---|")
    for entry in out:
        for t in entry["tests"]:
            x, y = t["arms"]
            n = f"{len(entry['arms'][x]['seeds'])} vs {len(entry['arms'][y]['seeds'])}"
            print(f"| {entry['length']:,} | {x} vs {y} | {n} | {t['p']:.3g} |")
    doc = dict(scaling=scaling, test="exact Wilcoxon-Mann-Whitney, two-sided", lengths=out)
    atomic_write(os.path.join(out_dir, "seeds.json"), lambda f: f.write(json.dumps(doc, indent=1)), mode="w",
                 what="seeds report")
    return doc


def digit_loss_means(members):
    """(steps, one list per answer token of its loss averaged over the runs at each step). A run that
    stopped early (it learned, or ran out of steps) counts with its last evaluation, so the mean does not
    jump when a run ends."""
    steps = sorted({e[0] for r in members for e in r["evals"]})
    tokens = max(len(e[2]) for r in members for e in r["evals"])
    means = [[] for _ in range(tokens)]
    for s in steps:
        latest = [max((e for e in r["evals"] if e[0] <= s), key=lambda e: e[0], default=None)
                  for r in members]
        for t in range(tokens):
            vals = [e[2][t] for e in latest if e is not None and len(e[2]) > t]
            means[t].append(sum(vals) / len(vals) if vals else float("nan"))
    return steps, means


def plot_digit_losses(arms, path, log=print):
    """Per arm, two panels: passkey accuracy against step (one line per seed), and the loss of each answer
    token (mean over the arm's seeds, a run that stopped early at its last evaluation; token 0 is the space
    before the key) against chance, ln 10."""
    plt = pyplot(log)
    if plt is None:
        return False
    fig, axes = plt.subplots(2, len(arms), figsize=(3.4 * len(arms), 6), squeeze=False, sharex=True,
                             sharey="row")
    for j, (arm, members) in enumerate(arms.items()):
        top, bottom = axes[0][j], axes[1][j]
        for r in members:
            top.plot([e[0] for e in r["evals"]], [e[1] for e in r["evals"]], marker="o", ms=2, lw=1,
                     label=f"seed {r['seed']}")
        steps, means = digit_loss_means(members)
        for t, mean in enumerate(means):
            bottom.plot(steps, mean, lw=1.2, label="space" if t == 0 else f"digit {t}")
        bottom.axhline(math.log(10), color="grey", ls=":", lw=1)
        top.set(title=f"{arm} (n={len(members)})", ylim=(-0.05, 1.05))
        bottom.set(xlabel="training step")
        top.legend(fontsize=6)
    axes[0][0].set_ylabel("passkey accuracy at 512")
    axes[1][0].set_ylabel("answer token loss (nats), mean of seeds\n(a stopped run at its last value)")
    axes[1][-1].legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, plt, path)


def main(argv):
    p = ArgumentParser(prog="python -m nanococa.report", description="Reports over results already written.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge",
                       help="join eval_length.py results of one plan (run side by side) into one table")
    m.add_argument("folders", nargs="+", metavar="EVAL_DIR")
    c = sub.add_parser("curves",
                       help="perplexity and passkey accuracy against training step, from runs' logs")
    c.add_argument("folders", nargs="+", metavar="RUN_DIR")
    r = sub.add_parser("runs", help="seeded passkey runs: when each learned, k of n per arm, exact tests")
    r.add_argument("folders", nargs="+", metavar="RUN_DIR")
    r.add_argument("--threshold", type=float, default=0.9, help="passkey accuracy that counts as learned")
    r.add_argument("--by", type=int, default=6000, help="learned by this step")
    d = sub.add_parser("seeds",
                       help="each arm's perplexity over its seeds, with exact rank tests between arms")
    d.add_argument("folder", metavar="REPORT_DIR", help="a folder holding runs.json and merged results.json")
    d.add_argument("--scaling", default="none", help="the scaling whose rows to compare")
    for q in (m, c, r, d):
        q.add_argument("--out_dir", default="report_out")
        q.add_argument("--overwrite", action="store_true", help="replace a report already in --out_dir")
    args = p.parse_args(argv)
    check_out_dir(args.out_dir)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    with file_lock(os.path.join(args.out_dir, ".lock"), wait=False, owner="nanococa.report",
                   busy_message=f"--out_dir={args.out_dir} is in use"):
        if args.command == "merge":
            check_no_results(args.out_dir, ["results.json", "results.csv"], args.overwrite)
            return merge(args.folders, args.out_dir, log)
        if args.command == "runs":
            check_no_results(args.out_dir, ["runs.json", "runs.csv", "digits.png"], args.overwrite)
            return runs_report(args.folders, args.out_dir, args.threshold, args.by, log)
        if args.command == "seeds":
            check_no_results(args.out_dir, ["seeds.json"], args.overwrite)
            return seeds_report(args.folder, args.scaling, args.out_dir)
        check_no_results(args.out_dir, ["curves.png"], args.overwrite)
        return curves(args.folders, args.out_dir, log)


if __name__ == "__main__":
    run_script(main)
