"""Perplexity and passkey retrieval against context length, several checkpoints side by side.

    python eval_length.py                                    # out/ckpt.pt, lengths 512 .. 32K
    python eval_length.py --ckpt out-coca out-rope --scalings none,yarn:dynamic,logn --passkey_trials 50
    python eval_length.py --ckpt out-pk-rope --lengths 512 --profile   # and where each layer and head attends

One row per (checkpoint, scaling), each cell with a 95% interval. Writes a Markdown table to stdout and
results.json, results.csv, results.png and passkey.png (the plots with matplotlib) to --out_dir, updated
as rows complete; with --profile also the attention profile and each head's role (profile.json). A GPT
checkpoint and a drop-in's (train.py --init_from=hf:MODEL) are measured alike. Protocols and intervals:
nanococa/evaluate.py and docs/coca.md. Reports over results already written (merging folders, training
curves): python -m nanococa.report.
"""
import argparse
import json
import os
import sys
import time

from nanococa.errors import ArgumentParser, UserError, interruptible, run_script

with interruptible():  # Ctrl-C while torch imports is one line too
    import torch

    from nanococa import evaluate, passkey, report
    from nanococa.checkpoint import load_model
    from nanococa.common import (DTYPES, SCALING_HELP, atomic_write, corpus_of, file_lock, memory_errors,
                                 parse_lengths, parse_scaling, resolve_device, resolve_dtype)
    from nanococa.data import Split, prepare

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
    p.add_argument("--scalings", default="none,dynamic:4",
                   help=f"comma-separated entries, each {SCALING_HELP}")
    p.add_argument("--passkey_trials", type=int, default=0,
                   help="passkey trials per length (0: no passkey test)")
    p.add_argument("--passkey_lengths", type=length_list, default=None,
                   help="measure passkey at these of --lengths only (none: at every length)")
    p.add_argument("--corpus", default=None,
                   help="score every checkpoint on this corpus (none: the checkpoints' own, when it is "
                        "a named one)")
    p.add_argument("--profile", action="store_true",
                   help="also: where each layer attends (mean distance, entropy of the last --target "
                        "queries) and each head's role at the training length (profile.json)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--data_dir", default="data_cache")
    p.add_argument("--out_dir", default="eval_out")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out_dir")
    p.add_argument("--seed", type=int, default=1337, help="passkey keys and depths, bootstrap draws")
    return p.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    scalings = check_args(args)
    with file_lock(os.path.join(args.out_dir, ".lock"), wait=False, owner="eval_length.py",
                   busy_message=f"--out_dir={args.out_dir} is in use"):
        report.check_no_results(args.out_dir, ["results.json", "results.csv"]
                                + (["profile.json"] if args.profile else []), args.overwrite)
        t0 = time.perf_counter()
        device = resolve_device(args.device)
        dtype = getattr(torch, resolve_dtype(args.dtype, device))
        models, corpus = load_models(args, device, dtype)
        tok = models[0][2]
        split = Split(prepare(corpus, tok, args.data_dir, log=lambda *a: None), "val")
        plan = plan_for(args, split, device)
        meta = dict(protocol=args.protocol, lengths=args.lengths, target=args.target, device=device,
                    dtype=str(dtype), seed=args.seed, checkpoints=[m[0] for m in models], corpus=corpus,
                    tokenizer=tok.name, train_len=models[0][1].config.block_size,
                    passkey_trials=args.passkey_trials, passkey_lengths=args.passkey_lengths,
                    passkey_depth_buckets=passkey.DEPTH_BUCKETS,
                    windows=[[split.names[d], e] for d, e in plan.windows or []],
                    interval="95% bootstrap over "
                    + ("windows" if args.protocol == "same-targets" else "documents"))
        log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        save = lambda rows: report.write_outputs(rows, meta, args.out_dir, plot=False)  # noqa: E731
        with memory_errors("the evaluation (try shorter --lengths, fewer --windows, or another --device)"):
            rows = evaluate.evaluate_models(models, scalings, split, plan, corpus, log, after_each=save)
            meta["seconds"] = time.perf_counter() - t0
            report.show_and_write(rows, meta, args.out_dir, args.passkey_trials, log)
            if args.profile:
                profile(models, scalings, split, plan, args, meta)
        return rows


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
        raise UserError(f"--passkey_trials={args.passkey_trials} must be between 0 and "
                        f"{MAX_PASSKEY_TRIALS:,} (100 trials give an interval of about +-0.1)")
    if args.passkey_lengths and not set(args.passkey_lengths) <= set(args.lengths):
        raise UserError(f"--passkey_lengths={args.passkey_lengths} must be among --lengths={args.lengths}")
    if args.seed < 0:
        raise UserError(f"--seed={args.seed} must not be negative")
    if args.protocol == "same-targets" and args.target > min(args.lengths):
        raise UserError(f"--target={args.target} is longer than the shortest length {min(args.lengths)}")
    if args.profile and args.protocol != "same-targets":
        raise UserError("--profile reads the same-targets windows: leave out --protocol=sliding")
    report.check_out_dir(args.out_dir)
    return [(name, s) for s, name in scalings.items()]


def load_models(args, device, dtype):
    """[(path, model, tokenizer)] and the corpus to score them on; the same checkpoint given twice counts
    once."""
    def file_of(p):
        return os.path.realpath(os.path.join(p, "ckpt.pt") if os.path.isdir(p) else p)
    paths = [p for i, p in enumerate(args.ckpt) if file_of(p) not in {file_of(q) for q in args.ckpt[:i]}]
    loaded = [(path, *load_model(path, device, dtype)) for path in paths]  # fail early on a bad path
    toks = {path: tok.name for path, _, tok, _ in loaded}
    if len(set(toks.values())) > 1:
        listed = ", ".join(f"{p}: {t}" for p, t in toks.items())
        raise UserError(f"these checkpoints use different tokenizers ({listed}): perplexity per byte and per "
                        "token cannot share a table; evaluate them in separate calls")
    corpora = {path: corpus_of(ckpt, args.corpus, path) for path, _, _, ckpt in loaded}
    if len(set(corpora.values())) > 1:
        listed = ", ".join(f"{p}: {c}" for p, c in corpora.items())
        raise UserError(f"these checkpoints were trained on different corpora ({listed}); give --corpus=NAME "
                        "to score them all on one")
    if args.profile and any(not hasattr(model, "transformer") for _, model, _, _ in loaded):
        raise UserError("--profile reads a GPT's layers; a drop-in (--init_from=hf:...) has none here")
    return [(path, model, tok) for path, model, tok, _ in loaded], next(iter(corpora.values()))


def plan_for(args, split, device):
    """The cells' common settings: the windows (same-targets) or documents (sliding), chosen once."""
    plan = evaluate.Plan(lengths=args.lengths, protocol=args.protocol, target=args.target, stride=args.stride,
                         passkey_trials=args.passkey_trials, passkey_lengths=args.passkey_lengths,
                         seed=args.seed, device=device)
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
            raise UserError(f"sliding: documents {short} are shorter than {max_len + 1:,} tokens; use "
                            "shorter --lengths")
        print(f"# validation documents {[split.names[d] for d in plan.docs]} truncated to {max_len:,} "
              f"tokens, stride {args.stride}", file=sys.stderr)
    return plan


def profile(models, scalings, split, plan, args, meta):
    """--profile: per layer, the attention-weighted mean distance and the entropy of the attention rows of the
    last --target queries of each window, averaged; then each head's role (evaluate.head_roles); two tables
    and profile.json."""
    rows = evaluate.profile_models(models, scalings, split, plan, args.target)
    layers = len(rows[0]["layers"])
    print("\nWhere each layer attends: attention-weighted mean distance and entropy (nats) of the last "
          f"{args.target} queries\n")
    print("| model | length | " + " | ".join(f"layer {i}: distance, entropy" for i in range(layers)) + " |")
    print("|---|---|" + "---|" * layers)
    for r in rows:
        print(f"| {r['checkpoint']} ({r['attention']}, {r['scaling']}) | {r['length']:,} | "
              + " | ".join(f"{x['mean_distance']:.0f}, {x['entropy']:.2f}" for x in r["layers"]) + " |")
    heads = {path: evaluate.head_roles(model, tok) for path, model, tok in models}
    print("\nHeads at the training length: mean attention weight on the previous token, on the token after "
          "the previous occurrence (induction), on the key's first digit (both mentions) from the query "
          "that writes it; one number per head\n")
    print("| model | layer | previous token | induction | passkey digit |\n|---|---|---|---|---|")
    for path, model, _ in models:
        for i in range(model.config.n_layer):
            print(f"| {path} ({model.config.attention}) | {i} | " + " | ".join(
                "-" if heads[path][k] is None else " ".join(f"{x:.2f}" for x in heads[path][k][i])
                for k in ("previous", "induction", "passkey")) + " |")
    path = os.path.join(args.out_dir, "profile.json")
    doc = json.dumps({"meta": meta, "profile": rows, "heads": heads}, indent=1)
    atomic_write(path, lambda f: f.write(doc), mode="w", what="profile")
    print(f"# wrote {path}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    run_script(main)
