"""Perplexity and passkey retrieval against context length, several checkpoints side by side.

    python eval_length.py                                    # out/ckpt.pt, lengths 512 .. 32K
    python eval_length.py --ckpt out-coca out-rope --scalings none,dynamic:4,logn,dynamic:4+logn --passkey-trials 20
    python eval_length.py --curves out-coca out-rope         # training curves from --eval_lengths logs

One row per (checkpoint, scaling), each cell with a 95% interval. Writes a Markdown table to stdout and
results.json, results.csv and results.png (with matplotlib) to --out-dir, updated as rows complete.
Protocols and intervals: see nanococa/evaluate.py and docs/coca.md.
"""
import argparse
import os
import sys
import time

import torch

from nanococa import evaluate
from nanococa.checkpoint import load_model
from nanococa.common import DTYPES, parse_lengths, resolve_device, resolve_dtype
from nanococa.data import Split, prepare
from nanococa.errors import ArgumentParser, UserError, run_script
from nanococa.model import Scaling, parse_scaling


def length_list(text):
    try:
        return parse_lengths(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", nargs="+", default=["out"], help="checkpoint files or folders (default: out)")
    p.add_argument("--lengths", type=length_list, default=length_list("512,1K,2K,4K,8K,16K,32K"))
    p.add_argument("--protocol", choices=["same-targets", "sliding"], default="same-targets")
    p.add_argument("--target", type=int, default=512, help="same-targets: tokens scored per window")
    p.add_argument("--windows", type=int, default=8, help="same-targets: number of windows")
    p.add_argument("--docs", type=int, default=2, help="sliding: number of documents")
    p.add_argument("--stride", type=int, default=512, help="sliding: stride")
    p.add_argument("--scalings", default="none,dynamic:4",
                   help="comma-separated entries, each none, dynamic:F, linear:F, logn or a +-joined mix (dynamic:4+logn)")
    p.add_argument("--passkey-trials", type=int, default=0, help="trials per length (0: no passkey test)")
    p.add_argument("--corpus", default=None, help="score every checkpoint on this corpus (default: its own)")
    p.add_argument("--curves", nargs="+", default=None, metavar="RUN_DIR",
                   help="plot perplexity against training step from these runs' log.jsonl, then stop")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--data-dir", default="data_cache")
    p.add_argument("--out-dir", default="eval_out")
    p.add_argument("--seed", type=int, default=1337)
    return p.parse_args(argv)


def check_args(args):
    try:
        scalings = [(s.strip(), parse_scaling(s)) for s in args.scalings.split(",")]
    except ValueError as e:
        raise UserError(f"--scalings: {e}") from None
    if len({name for name, _ in scalings}) < len(scalings):
        raise UserError(f"--scalings={args.scalings}: an entry appears twice")
    if args.target < 1 or args.windows < 1 or args.docs < 1 or args.stride < 1 or args.passkey_trials < 0:
        raise UserError("--target, --windows, --docs and --stride must be at least 1, --passkey-trials at least 0")
    if args.protocol == "same-targets" and args.target > min(args.lengths):
        raise UserError(f"--target={args.target} is longer than the shortest length {min(args.lengths)}")
    try:  # the results must have somewhere to go before the evaluation starts
        os.makedirs(args.out_dir, exist_ok=True)
        probe = os.path.join(args.out_dir, f".write-test.{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--out-dir={args.out_dir} cannot be written ({e.strerror or e})") from None
    return scalings


def effective(model, scaling):
    """The scaling that actually acts on this model: ALiBi has no rotary, so a rope scaling does nothing."""
    return Scaling(None, scaling.logn) if model.config.attention == "alibi" else scaling


def load_models(args, device, dtype):
    models = [(path, *load_model(path, device, dtype)) for path in args.ckpt]  # fail early on a bad path
    toks = {path: tok.name for path, _, tok, _ in models}
    if len(set(toks.values())) > 1:
        raise UserError(f"these checkpoints use different tokenizers ({', '.join(f'{p}: {t}' for p, t in toks.items())}): "
                        "perplexity per byte and per token cannot share a table; evaluate them in separate calls")
    corpora = {path: args.corpus or ckpt.get("train_config", {}).get("corpus", "shakespeare")
               for path, _, _, ckpt in models}
    if len(set(corpora.values())) > 1:
        raise UserError(f"these checkpoints were trained on different corpora ({', '.join(f'{p}: {c}' for p, c in corpora.items())}); "
                        "give --corpus=NAME to score them all on one")
    return models, next(iter(corpora.values()))


def main(argv):
    args = parse_args(argv)
    scalings = check_args(args)
    if args.curves:
        path = os.path.join(args.out_dir, "curves.png")
        for label, _, points in evaluate.plot_training_curves(args.curves, path, log=lambda m: print(m, file=sys.stderr)):
            last_iter, last = points[-1]
            print(f"{label}: step {last_iter}: " + ", ".join(f"ppl@{n:,} {p:.2f}" for n, p in sorted(last.items())))
        print(f"# wrote {path}", file=sys.stderr)
        return None
    device = resolve_device(args.device)
    dtype = getattr(torch, resolve_dtype(args.dtype, device))
    max_len = max(args.lengths)
    models, corpus = load_models(args, device, dtype)
    tok = models[0][2]
    split = Split(prepare(corpus, tok, args.data_dir, log=lambda *a: None), "val")
    rows, meta = [], dict(protocol=args.protocol, lengths=args.lengths, target=args.target, device=device,
                          dtype=str(dtype), seed=args.seed, checkpoints=args.ckpt, corpus=corpus, tokenizer=tok.name,
                          interval="95% bootstrap over " + ("windows" if args.protocol == "same-targets" else "documents"))
    if args.protocol == "same-targets":  # the same windows for every checkpoint: one corpus, one tokenizer
        windows = evaluate.pick_windows(split, max_len, args.target, args.windows)
        used = ", ".join(f"{split.names[d]}[{e - args.target}:{e}]" for d, e in windows)
        print(f"# {corpus} validation, {len(windows)} windows x {args.target} target tokens "
              f"= {len(windows) * args.target:,} scored at every length: {used}", file=sys.stderr)
        meta["windows"] = [[split.names[d], e] for d, e in windows]
    else:
        docs = sorted(range(len(split.names)), key=lambda i: -split.doc_tokens[i])[:args.docs]
        short = [split.names[d] for d in docs if split.doc_tokens[d] - 1 < max_len + 1]
        if short:
            raise UserError(f"sliding: documents {short} are shorter than {max_len + 1:,} tokens; use shorter --lengths")
        print(f"# {corpus} validation, documents {[split.names[d] for d in docs]} truncated to "
              f"{max_len:,} tokens, stride {args.stride}", file=sys.stderr)
    passkey_min = evaluate.passkey_min_length(tok)
    t_all = time.perf_counter()
    for path, model, _, ckpt in models:
        meta["train_len"] = model.config.block_size
        done = {}  # effective scaling -> the rows measured with it (ALiBi ignores rope scalings)
        for name, scaling in scalings:
            eff = effective(model, scaling)
            for n in args.lengths:
                base = dict(checkpoint=path, attention=model.config.attention, attn_scale=model.config.attn_scale,
                            corpus=corpus, tokenizer=tok.name, scaling=name, protocol=args.protocol, length=n)
                if (eff, n) in done:
                    prev = done[eff, n]
                    note = f"same as {prev['scaling']}: no rotary, so the rope scaling does nothing"
                    rows.append({**prev, **base, "note": "; ".join(filter(None, (prev["note"], note)))})
                    continue
                t0 = time.perf_counter()
                if args.protocol == "same-targets":
                    ppl, units, _ = evaluate.same_targets_perplexity(model, split, windows, n, args.target, eff, device)
                    count = len(windows) * args.target
                else:
                    ppl, units, count = evaluate.sliding_perplexity(model, split, docs, n, max_len, args.stride, eff, device)
                lo, hi = evaluate.bootstrap_interval(units, seed=args.seed)
                row = dict(base, perplexity=ppl, perplexity_lo=lo, perplexity_hi=hi, units=len(units), targets=count,
                           unit_nll=units, passkey_accuracy=None, passkey_lo=None, passkey_hi=None,
                           passkey_trials=args.passkey_trials or None, note=None)
                if args.passkey_trials and n < passkey_min:
                    row["note"] = f"passkey needs at least {passkey_min} tokens"
                elif args.passkey_trials:
                    acc = evaluate.passkey_accuracy(model, tok, n, args.passkey_trials, eff, args.seed, device)
                    pk = evaluate.wilson_interval(round(acc * args.passkey_trials), args.passkey_trials)
                    row.update(passkey_accuracy=acc, passkey_lo=pk[0], passkey_hi=pk[1])
                rows.append(row)
                done[eff, n] = row
                print(f"  {path} {evaluate.method(row)} {name:>14} L={n:>6,}: ppl {ppl:9.3f}"
                      + (f" ({lo:.2f}-{hi:.2f})" if lo is not None else "")
                      + (f" passkey {row['passkey_accuracy']:.2f}" if row["passkey_accuracy"] is not None else "")
                      + f"  ({time.perf_counter() - t0:.1f} s, {time.perf_counter() - t_all:.0f} s in all)",
                      file=sys.stderr, flush=True)
            evaluate.write_outputs(rows, meta, args.out_dir, plot=False)  # partial results survive an interrupt
    print(f"\nPerplexity ({args.protocol}; lower is better; 95% interval over "
          f"{'windows' if args.protocol == 'same-targets' else 'documents'} in parentheses)\n")
    print(evaluate.markdown_table(rows, "perplexity"))
    if args.passkey_trials:
        print(f"\nPasskey accuracy ({args.passkey_trials} trials per length, 95% Wilson interval)\n")
        print(evaluate.markdown_table(rows, "passkey_accuracy"))
    meta["seconds"] = time.perf_counter() - t_all
    evaluate.write_outputs(rows, meta, args.out_dir, log=lambda m: print(m, file=sys.stderr))
    print(f"\n# wrote {args.out_dir}/results.json, results.csv, results.png ({meta['seconds']:.0f} s)", file=sys.stderr)
    return rows


if __name__ == "__main__":
    run_script(main)
