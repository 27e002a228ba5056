"""Sample from a trained checkpoint with a key/value cache, up to 32K tokens of context.

    python sample.py                                   # from out/ckpt.pt, the default of train.py
    python sample.py --prompt_val_tokens=32000 --scaling=dynamic:4+logn --max_new_tokens=200
    python sample.py --ckpt=out-pycode --prompt_file=big.py --scaling=yarn:dynamic

The prompt is prefilled in chunks (--prefill_chunk tokens at a time, never a T x T matrix), then tokens
are decoded one at a time and streamed. With a dynamic scaling (dynamic NTK, yarn:dynamic) the rotary
tables are fixed from the final length (prompt + new tokens) before prefill, so cached keys stay exact.
Ends with prefill time, tokens/s and peak memory.
"""
import math
import resource
import sys

from nanococa.errors import ArgumentParser, UserError, interruptible, run_script

with interruptible():  # Ctrl-C while torch imports is one line too
    import torch

    from nanococa.checkpoint import load_model
    from nanococa.common import (DTYPES, SCALING_HELP, corpus_of, memory_errors, method_name, parse_scaling,
                                 resolve_device, resolve_dtype)
    from nanococa.data import Split, prepare
    from nanococa.sampling import Streamer, check_cache_fits, read_prompt_file, timed_generation

MIN_TEMPERATURE = 1e-4  # below it (but above 0, greedy) logits / temperature overflow float32


def parse_args(argv):
    p = ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="out", help="checkpoint file or folder holding ckpt.pt")
    p.add_argument("--prompt", default=None, help="prompt text (none: start a new document)")
    p.add_argument("--prompt_file", default=None, help="read the prompt from this file (a play, a book...)")
    p.add_argument("--prompt_val_tokens", type=int, default=None, metavar="N",
                   help="prompt with the first N tokens of the longest validation document of the "
                        "checkpoint's corpus")
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--max_context", type=int, default=32768, help="largest prompt + new tokens allowed")
    p.add_argument("--scaling", "--rope_scaling", default="none", help=f"context extension: {SCALING_HELP}")
    p.add_argument("--prefill_chunk", type=int, default=1024)
    p.add_argument("--corpus", default=None,
                   help="--prompt_val_tokens reads this corpus (none: the checkpoint's, when it is a named "
                        "one)")
    p.add_argument("--data_dir", default="data_cache",
                   help="where --prompt_val_tokens finds the tokenized corpus")
    return p.parse_args(argv)


def check(args):
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens={args.max_new_tokens} must be at least 1")
    if not (args.temperature == 0 or MIN_TEMPERATURE <= args.temperature < math.inf):
        raise UserError(f"--temperature={args.temperature} must be 0 (greedy) or a finite number of at least "
                        f"{MIN_TEMPERATURE} (smaller ones overflow the logits)")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top_k={args.top_k} must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top_p={args.top_p} must be in (0, 1]")
    if args.num_samples < 1 or args.prefill_chunk < 1 or args.max_context < 2:
        raise UserError("--num_samples and --prefill_chunk must be at least 1, --max_context at least 2")
    if args.prompt_val_tokens is not None and args.prompt_val_tokens < 1:
        raise UserError(f"--prompt_val_tokens={args.prompt_val_tokens} must be at least 1")
    if sum(x is not None for x in (args.prompt, args.prompt_file, args.prompt_val_tokens)) > 1:
        raise UserError("give one of --prompt, --prompt_file and --prompt_val_tokens")
    try:
        return parse_scaling(args.scaling)
    except ValueError as e:
        raise UserError(f"--scaling: {e}") from None


def prompt_ids(args, tok, ckpt):
    """Token ids of the prompt: text, a file, or the start of the longest validation document."""
    if args.prompt_file is not None:
        args.prompt, replaced = read_prompt_file(args.prompt_file, 8 * args.max_context)
        if replaced:
            print(f"# note: {replaced:,} bytes of {args.prompt_file} are not UTF-8 and became U+FFFD",
                  file=sys.stderr)
    if args.prompt_val_tokens is not None:
        corpus = corpus_of(ckpt, args.corpus, args.ckpt)
        val = Split(prepare(corpus, tok, args.data_dir, log=lambda *a: None), "val")
        doc = max(range(len(val.names)), key=lambda i: val.doc_tokens[i])
        ids = val.document(doc)[:args.prompt_val_tokens].tolist()
        print(f"# prompt: the first {len(ids):,} tokens of {val.names[doc]} ({corpus} validation)",
              file=sys.stderr)
        return ids
    if args.prompt is not None and not args.prompt:
        raise UserError("the prompt is empty; leave --prompt out to start a new document")
    return tok.encode(args.prompt) if args.prompt is not None else [tok.eot]


def main(argv):
    args = parse_args(argv)
    scaling = check(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tok, ckpt = load_model(args.ckpt, device, getattr(torch, dtype))
    if not hasattr(model, "generate_stream"):
        raise UserError(f"{args.ckpt} is a drop-in (a converted Hugging Face model): generate from it with "
                        "transformers (checkpoint.load_model(path)[0].model.generate); sample.py samples "
                        "GPTs")
    ids = prompt_ids(args, tok, ckpt)
    total = len(ids) + args.max_new_tokens
    if total > args.max_context:
        raise UserError(f"prompt ({len(ids):,} tokens) + --max_new_tokens ({args.max_new_tokens:,}) = "
                        f"{total:,} exceeds --max_context={args.max_context:,}")
    cfg = model.config
    check_cache_fits(cfg, 1, total, getattr(torch, dtype), device)
    print(f"# {args.ckpt}: {method_name(cfg.attention, cfg.attn_scale)}, {model.num_params() / 1e6:.2f}M "
          f"parameters, trained at {cfg.block_size} (iter {ckpt.get('iter', '?')}); prompt {len(ids):,} "
          f"tokens, scaling {args.scaling}; {device} {dtype}", file=sys.stderr)
    if cfg.attention == "alibi" and scaling.rope:
        print(f"# note: ALiBi has no rotary, so the rope scaling in {args.scaling} does nothing"
              + (" (logn still applies)" if scaling.logn else ""), file=sys.stderr)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    for s in range(args.num_samples):
        if args.num_samples > 1:
            print(f"\n---------- sample {s + 1}/{args.num_samples}", flush=True)
        if len(ids) <= 2000 and ids != [tok.eot]:
            print(tok.decode(ids), end="", flush=True)
        streamer = Streamer(tok)
        with memory_errors("generation (ask for fewer tokens: --max_new_tokens, --max_context)"):
            timing = timed_generation(model, idx, args.max_new_tokens, on_token=streamer.add,
                                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                      scaling=scaling, prefill_chunk=args.prefill_chunk, generator=gen)
        streamer.close()
        if device.startswith("cuda"):
            peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on the GPU"
        else:
            peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident"
        print(f"# prefill {len(ids):,} tokens in {timing.prefill_s:.2f} s "
              f"({len(ids) / timing.prefill_s:,.0f} tok/s); decode {timing.decode_tokens_per_s:.1f} tok/s; "
              f"peak memory {peak}", file=sys.stderr)


if __name__ == "__main__":
    run_script(main)
