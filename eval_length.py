"""Perplexity and passkey retrieval against context length, several checkpoints side by side.

    python eval_length.py                                    # out/ckpt.pt, lengths 512 .. 32K
    python eval_length.py --ckpt out-coca out-rope --scalings none,dynamic:4,yarn:dynamic,logn --passkey_trials 50
    python eval_length.py --curves out-coca out-rope         # training curves from --eval_lengths logs

One row per (checkpoint, scaling), each cell with a 95% interval. Writes a Markdown table to stdout and
results.json, results.csv, results.png and passkey.png (the plots with matplotlib) to --out_dir, updated
as rows complete. Protocols and intervals: nanococa/evaluate.py and docs/coca.md.
"""
import argparse
import json
import os
import sys
import time

import torch

from nanococa import evaluate, passkey, report
from nanococa.checkpoint import load_model
from nanococa.common import (DTYPES, SCALING_HELP, atomic_write, file_lock, parse_lengths, parse_scaling, resolve_device,
                             resolve_dtype)
from nanococa.data import Split, prepare
from nanococa.errors import ArgumentParser, UserError, run_script

MAX_PASSKEY_TRIALS = 10_000  # per cell; 50-100 give intervals of +-0.1-0.14, more than 10,000 is a mistake


def length_list(text):
    try:
        return parse_lengths(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv):
    p = ArgumentParser(prog="eval_length.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", nargs="+", default=["out"], help="checkpoint files or folders")
    p.add_argument("--lengths", type=length_list, default=length_list("512,1K,2K,4K,8K,16K,32K"),
                   help="context lengths (K = 1024)")
    p.add_argument("--protocol", choices=["same-targets", "sliding"], default="same-targets")
    p.add_argument("--target", type=int, default=512, help="same-targets: tokens scored per window")
    p.add_argument("--windows", type=int, default=8, help="same-targets: number of windows")
    p.add_argument("--docs", type=int, default=2, help="sliding: number of documents")
    p.add_argument("--stride", type=int, default=512, help="sliding: stride")
    p.add_argument("--scalings", default="none,dynamic:4", help=f"comma-separated entries, each {SCALING_HELP}")
    p.add_argument("--passkey_trials", type=int, default=0, help="passkey trials per length (0: no passkey test)")
    p.add_argument("--passkey_lengths", type=length_list, default=None,
                   help="measure passkey at these of --lengths only (none: at every length)")
    p.add_argument("--corpus", default=None, help="score every checkpoint on this corpus (none: the checkpoints' own)")
    p.add_argument("--curves", nargs="+", default=None, metavar="RUN_DIR",
                   help="plot perplexity and passkey accuracy against training step from these runs' log.jsonl")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--data_dir", default="data_cache")
    p.add_argument("--out_dir", default="eval_out")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out_dir")
    p.add_argument("--seed", type=int, default=1337, help="passkey keys and depths, bootstrap draws")
    p.add_argument("--merge", nargs="+", default=None, metavar="OUT_DIR",
                   help="instead: join the results of evaluations run side by side (same windows) into --out_dir")
    p.add_argument("--profile", action="store_true",
                   help="instead: where each layer attends (mean distance, entropy of the last --target queries)")
    return p.parse_args(argv)


def check_args(args):
    """Every option checked before any work; returns the scalings [(name, Scaling)], repeats dropped."""
    scalings = {}
    for name in (s.strip() for s in args.scalings.split(",")):
        try:
            scalings.setdefault(parse_scaling(name), name)  # dynamic:4 and dynamic:4.0 are one scaling
        except ValueError as e:
            raise UserError(f"--scalings: {e}") from None
    if args.target < 1 or args.windows < 1 or args.docs < 1 or args.stride < 1:
        raise UserError("--target, --windows, --docs and --stride must be at least 1")
    if not 0 <= args.passkey_trials <= MAX_PASSKEY_TRIALS:
        raise UserError(f"--passkey_trials={args.passkey_trials} must be between 0 and {MAX_PASSKEY_TRIALS:,} "
                        "(100 trials give an interval of about +-0.1)")
    if args.passkey_lengths and not set(args.passkey_lengths) <= set(args.lengths):
        raise UserError(f"--passkey_lengths={args.passkey_lengths} must be among --lengths={args.lengths}")
    if args.seed < 0:
        raise UserError(f"--seed={args.seed} must not be negative")
    if args.protocol == "same-targets" and args.target > min(args.lengths):
        raise UserError(f"--target={args.target} is longer than the shortest length {min(args.lengths)}")
    try:  # the results must have somewhere to go before the evaluation starts
        os.makedirs(args.out_dir, exist_ok=True)
        probe = os.path.join(args.out_dir, f".write-test.{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--out_dir={args.out_dir} cannot be written ({e.strerror or e})") from None
    return [(name, s) for s, name in scalings.items()]


def check_no_results(args, names):
    if args.overwrite:
        return
    there = [n for n in names if os.path.exists(os.path.join(args.out_dir, n))]
    if there:
        raise UserError(f"--out_dir={args.out_dir} already holds {', '.join(there)}: choose another --out_dir, "
                        "or replace them with --overwrite")


def load_models(args, device, dtype):
    """[(path, model, tokenizer)] and the corpus to score them on; the same checkpoint given twice counts once."""
    def file_of(p):
        return os.path.realpath(os.path.join(p, "ckpt.pt") if os.path.isdir(p) else p)
    paths = [p for i, p in enumerate(args.ckpt) if file_of(p) not in {file_of(q) for q in args.ckpt[:i]}]
    loaded = [(path, *load_model(path, device, dtype)) for path in paths]  # fail early on a bad path
    toks = {path: tok.name for path, _, tok, _ in loaded}
    if len(set(toks.values())) > 1:
        listed = ", ".join(f"{p}: {t}" for p, t in toks.items())
        raise UserError(f"these checkpoints use different tokenizers ({listed}): perplexity per byte and per token "
                        "cannot share a table; evaluate them in separate calls")
    corpora = {path: args.corpus or ckpt.get("train_config", {}).get("corpus", "shakespeare")
               for path, _, _, ckpt in loaded}
    if len(set(corpora.values())) > 1:
        listed = ", ".join(f"{p}: {c}" for p, c in corpora.items())
        raise UserError(f"these checkpoints were trained on different corpora ({listed}); give --corpus=NAME to "
                        "score them all on one")
    return [(path, model, tok) for path, model, tok, _ in loaded], next(iter(corpora.values()))


def plan_for(args, split, device):
    """The cells' common settings: the windows (same-targets) or documents (sliding), chosen once."""
    plan = evaluate.Plan(lengths=args.lengths, protocol=args.protocol, target=args.target, stride=args.stride,
                         passkey_trials=args.passkey_trials, passkey_lengths=args.passkey_lengths, seed=args.seed,
                         device=device)
    max_len = max(args.lengths)
    if args.protocol == "same-targets":  # the same windows for every checkpoint: one corpus, one tokenizer
        plan.windows = evaluate.pick_windows(split, max_len, args.target, args.windows)
        used = ", ".join(f"{split.names[d]}[{e - args.target}:{e}]" for d, e in plan.windows)
        print(f"# validation: {len(plan.windows)} windows x {args.target} target tokens "
              f"= {len(plan.windows) * args.target:,} scored at every length: {used}", file=sys.stderr)
    else:
        plan.docs = sorted(range(len(split.names)), key=lambda i: -split.doc_tokens[i])[:args.docs]
        short = [split.names[d] for d in plan.docs if split.doc_tokens[d] - 1 < max_len + 1]
        if short:
            raise UserError(f"sliding: documents {short} are shorter than {max_len + 1:,} tokens; use shorter --lengths")
        print(f"# validation documents {[split.names[d] for d in plan.docs]} truncated to {max_len:,} tokens, "
              f"stride {args.stride}", file=sys.stderr)
    return plan


def curves(args):
    path = os.path.join(args.out_dir, "curves.png")
    runs, plotted = report.plot_training_curves(args.curves, path, log=lambda m: print(m, file=sys.stderr))
    for label, _, _, points in runs:
        step, ppl, pk = points[-1]
        print(f"{label}: step {step}: " + ", ".join([f"ppl@{n:,} {p:.2f}" for n, p in sorted(ppl.items())]
                                                    + ([f"passkey {pk:.2f}"] if pk is not None else [])))
    if plotted:
        print(f"# wrote {path}", file=sys.stderr)


def profile(models, scalings, split, plan, args, meta):
    """--profile: per layer, the attention-weighted mean distance and the entropy of the attention rows of the
    last --target queries of each window, averaged; then each head's role (evaluate.head_roles); two tables
    and profile.json."""
    rows = evaluate.profile_models(models, scalings, split, plan, args.target)
    layers = len(rows[0]["layers"])
    print("| model | length | " + " | ".join(f"layer {i}: distance, entropy" for i in range(layers)) + " |")
    print("|---|---|" + "---|" * layers)
    for r in rows:
        print(f"| {r['checkpoint']} ({r['attention']}, {r['scaling']}) | {r['length']:,} | "
              + " | ".join(f"{x['mean_distance']:.0f}, {x['entropy']:.2f}" for x in r["layers"]) + " |")
    heads = {path: evaluate.head_roles(model, tok) for path, model, tok in models}
    print("\nHeads at the training length: mean attention weight on the previous token, on the token after the"
          " previous occurrence (induction), on the key's first digit (both mentions) from the query that writes it;"
          " one number per head\n")
    print("| model | layer | previous token | induction | passkey digit |\n|---|---|---|---|---|")
    for path, model, _ in models:
        for i in range(model.config.n_layer):
            print(f"| {path} ({model.config.attention}) | {i} | " + " | ".join(
                "-" if heads[path][k] is None else " ".join(f"{x:.2f}" for x in heads[path][k][i])
                for k in ("previous", "induction", "passkey")) + " |")
    path = os.path.join(args.out_dir, "profile.json")
    atomic_write(path, lambda f: f.write(json.dumps({"meta": meta, "profile": rows, "heads": heads}, indent=1)),
                 mode="w", what="profile")
    print(f"# wrote {path}", file=sys.stderr)
    return rows


def merge(args):
    """--merge: results.json of several evaluations of one plan (corpus, protocol, windows, lengths) as one table."""
    docs = []
    for folder in args.merge:
        try:
            with open(os.path.join(folder, "results.json")) as f:
                docs.append(json.load(f))
        except (OSError, ValueError) as e:
            raise UserError(f"--merge: cannot read {folder}/results.json ({e})") from None
    same = ("protocol", "lengths", "target", "corpus", "tokenizer", "windows", "seed")
    for folder, doc in zip(args.merge[1:], docs[1:]):
        differ = [k for k in same if doc["meta"].get(k) != docs[0]["meta"].get(k)]
        if differ:
            raise UserError(f"--merge: {folder} was evaluated with another {', '.join(differ)} than {args.merge[0]}")
    with_passkey = [(folder, doc["meta"]) for folder, doc in zip(args.merge, docs) if doc["meta"].get("passkey_trials")]
    for folder, m in with_passkey[1:]:  # one passkey plan too: a table heads every cell with one trial count
        differ = [k for k in ("passkey_trials", "passkey_depth_buckets") if m.get(k) != with_passkey[0][1].get(k)]
        if differ:
            raise UserError(f"--merge: {folder} measured passkey with another {', '.join(differ)} "
                            f"than {with_passkey[0][0]}")
    rows = [r for doc in docs for r in doc["results"]]
    meta = {**docs[0]["meta"], "checkpoints": [c for doc in docs for c in doc["meta"]["checkpoints"]],
            "merged_from": args.merge, "seconds": sum(doc["meta"].get("seconds", 0) for doc in docs)}
    if with_passkey:
        lengths = {n for _, m in with_passkey for n in m.get("passkey_lengths") or m["lengths"]}
        meta.update({k: with_passkey[0][1].get(k) for k in ("passkey_trials", "passkey_depth_buckets")},
                    passkey_lengths=sorted(lengths))
    return show_and_write(rows, meta, args.out_dir, meta.get("passkey_trials") if with_passkey else 0,
                          log=lambda m: print(m, file=sys.stderr))


def show_and_write(rows, meta, out_dir, passkey_trials, log):
    """The tables on stdout (passkey's when it was measured), then every output file; returns rows."""
    print(f"\nPerplexity ({meta['protocol']}; lower is better; 95% interval over "
          f"{'windows' if meta['protocol'] == 'same-targets' else 'documents'} in parentheses)\n")
    print(report.markdown_table(rows, "perplexity"))
    if passkey_trials:
        print(f"\nPasskey accuracy ({passkey_trials} trials per length, 95% Wilson interval)\n")
        print(report.markdown_table(rows, "passkey_accuracy"))
    written = report.write_outputs(rows, meta, out_dir, log=log)
    print(f"\n# wrote {', '.join(written)}", file=sys.stderr)
    return rows


def main(argv):
    args = parse_args(argv)
    scalings = check_args(args)
    busy = f"another eval_length.py is writing to --out_dir={args.out_dir}; wait for it or choose another folder"
    with file_lock(os.path.join(args.out_dir, ".lock"), wait=False, busy_message=busy):
        if args.curves:
            return curves(args)
        if args.merge:
            check_no_results(args, ["results.json", "results.csv"])
            return merge(args)
        check_no_results(args, ["profile.json"] if args.profile else ["results.json", "results.csv"])
        t0 = time.perf_counter()
        device = resolve_device(args.device)
        dtype = getattr(torch, resolve_dtype(args.dtype, device))
        models, corpus = load_models(args, device, dtype)
        tok = models[0][2]
        split = Split(prepare(corpus, tok, args.data_dir, log=lambda *a: None), "val")
        plan = plan_for(args, split, device)
        meta = dict(protocol=args.protocol, lengths=args.lengths, target=args.target, device=device,
                    dtype=str(dtype), seed=args.seed, checkpoints=[m[0] for m in models], corpus=corpus,
                    tokenizer=tok.name, train_len=models[0][1].config.block_size, passkey_trials=args.passkey_trials,
                    passkey_lengths=args.passkey_lengths,
                    passkey_depth_buckets=passkey.DEPTH_BUCKETS, windows=[[split.names[d], e] for d, e in plan.windows or []],
                    interval="95% bootstrap over " + ("windows" if args.protocol == "same-targets" else "documents"))
        log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        if args.profile:
            return profile(models, scalings, split, plan, args, meta)
        save = lambda rows: report.write_outputs(rows, meta, args.out_dir, plot=False)  # noqa: E731
        rows = evaluate.evaluate_models(models, scalings, split, plan, corpus, log, after_each=save)
        meta["seconds"] = time.perf_counter() - t0
        return show_and_write(rows, meta, args.out_dir, args.passkey_trials, log)


if __name__ == "__main__":
    run_script(main)
