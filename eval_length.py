"""Perplexity and passkey retrieval against context length, several checkpoints side by side.

    python eval_length.py                                    # out/ckpt.pt, lengths 512 .. 32K
    python eval_length.py --ckpt out-pycode-coca out-pycode-rope --scalings none,dynamic:4 --passkey-trials 20

One row per (checkpoint, rope scaling). Writes a Markdown table to stdout and results.json,
results.csv and results.png (with matplotlib) to --out-dir. Protocols: see nanococa/evaluate.py.
"""
import argparse
import sys
import time

import torch

from nanococa import evaluate
from nanococa.checkpoint import load_model
from nanococa.data import Split, prepare
from nanococa.errors import UserError, run_script
from nanococa.model import parse_scaling
from nanococa.trainer import resolve_device, resolve_dtype


def int_list(text):
    try:
        values = [int(x[:-1]) * 1024 if x[-1] in "kK" else int(x) for x in map(str.strip, text.split(",")) if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of lengths (e.g. 512,1K,2K)") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: lengths must be at least 2")
    return sorted(set(values))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", nargs="+", default=["out"], help="checkpoint files or folders (default: out)")
    p.add_argument("--lengths", type=int_list, default=int_list("512,1K,2K,4K,8K,16K,32K"))
    p.add_argument("--protocol", choices=["same-targets", "sliding"], default="same-targets")
    p.add_argument("--target", type=int, default=512, help="same-targets: tokens scored per window")
    p.add_argument("--windows", type=int, default=4, help="same-targets: number of windows")
    p.add_argument("--docs", type=int, default=2, help="sliding: number of documents")
    p.add_argument("--stride", type=int, default=512, help="sliding: stride")
    p.add_argument("--scalings", default="none,dynamic:4", help="comma-separated: none, dynamic:F, linear:F")
    p.add_argument("--passkey-trials", type=int, default=0, help="trials per length (0: no passkey test)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float64"])
    p.add_argument("--data-dir", default="data_cache")
    p.add_argument("--out-dir", default="eval_out")
    p.add_argument("--seed", type=int, default=1337)
    return p.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    try:
        scalings = [(s, parse_scaling(s)) for s in args.scalings.split(",")]
    except ValueError as e:
        raise UserError(f"--scalings: {e}") from None
    if args.target < 1 or args.windows < 1 or args.docs < 1 or args.stride < 1 or args.passkey_trials < 0:
        raise UserError("--target, --windows, --docs and --stride must be at least 1, --passkey-trials at least 0")
    if args.protocol == "same-targets" and args.target > min(args.lengths):
        raise UserError(f"--target={args.target} is longer than the shortest length {min(args.lengths)}")
    device = resolve_device(args.device)
    dtype = getattr(torch, resolve_dtype(args.dtype, device))
    max_len = max(args.lengths)
    models = [(path, *load_model(path, device, dtype)) for path in args.ckpt]  # fail early on a bad path
    rows, meta = [], dict(protocol=args.protocol, lengths=args.lengths, target=args.target, device=device,
                          dtype=str(dtype), seed=args.seed, checkpoints=args.ckpt)
    for path, model, tok, ckpt in models:
        corpus = ckpt.get("train_config", {}).get("corpus", "shakespeare")
        split = Split(prepare(corpus, tok, args.data_dir, log=lambda *a: None), "val")
        meta["train_len"] = model.config.block_size
        if args.protocol == "same-targets":
            windows = evaluate.pick_windows(split, max_len, args.target, args.windows)
            used = ", ".join(f"{split.names[d]}[{e - args.target}:{e}]" for d, e in windows)
            print(f"# {path}: {corpus} validation, {len(windows)} windows x {args.target} target tokens "
                  f"= {len(windows) * args.target:,} scored at every length: {used}", file=sys.stderr)
            meta.setdefault("windows", {})[path] = [[split.names[d], e] for d, e in windows]
        else:
            docs = sorted(range(len(split.names)), key=lambda i: -split.doc_tokens[i])[:args.docs]
            short = [split.names[d] for d in docs if split.doc_tokens[d] - 1 < max_len + 1]
            if short:
                raise UserError(f"sliding: documents {short} are shorter than {max_len + 1:,} tokens; use shorter --lengths")
            print(f"# {path}: {corpus} validation, documents {[split.names[d] for d in docs]} truncated to "
                  f"{max_len:,} tokens, stride {args.stride}", file=sys.stderr)
        for name, scaling in scalings:
            for n in args.lengths:
                t0 = time.perf_counter()
                if args.protocol == "same-targets":
                    ppl, _ = evaluate.same_targets_perplexity(model, split, windows, n, args.target, scaling, device)
                    count = len(windows) * args.target
                else:
                    ppl, count = evaluate.sliding_perplexity(model, split, docs, n, max_len, args.stride, scaling, device)
                acc = None
                if args.passkey_trials and n >= evaluate.passkey_min_length(tok):
                    acc = evaluate.passkey_accuracy(model, tok, n, args.passkey_trials, scaling, args.seed, device)
                rows.append(dict(checkpoint=path, attention=model.config.attention, corpus=corpus, scaling=name,
                                 protocol=args.protocol, length=n, perplexity=ppl, targets=count,
                                 passkey_accuracy=acc, passkey_trials=args.passkey_trials or None))
                print(f"  {path} {model.config.attention} {name:>10} L={n:>6,}: ppl {ppl:9.3f}"
                      + (f" passkey {acc:.2f}" if acc is not None else "") + f"  ({time.perf_counter() - t0:.1f} s)",
                      file=sys.stderr, flush=True)
    print(f"\nPerplexity ({args.protocol}; lower is better)\n")
    print(evaluate.markdown_table(rows, "perplexity", lambda v: f"{v:.2f}"))
    if args.passkey_trials:
        print(f"\nPasskey accuracy ({args.passkey_trials} trials per length)\n")
        print(evaluate.markdown_table(rows, "passkey_accuracy", lambda v: f"{v:.2f}"))
    evaluate.write_outputs(rows, meta, args.out_dir, log=lambda m: print(m, file=sys.stderr))
    print(f"\n# wrote {args.out_dir}/results.json, results.csv" + ", results.png", file=sys.stderr)
    return rows


if __name__ == "__main__":
    run_script(main)
