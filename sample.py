"""Sample from a trained checkpoint with a key/value cache, up to 32K tokens of context.

    python sample.py                                   # from out/ckpt.pt, the default of train.py
    python sample.py --ckpt=out-pycode --prompt-file=big.py --rope-scaling=dynamic:4 --max-new-tokens=200

The prompt is prefilled in chunks (--prefill-chunk tokens at a time, never a T x T matrix), then tokens
are decoded one at a time and streamed. With dynamic NTK the rotary base is fixed from the final length
(prompt + new tokens) before prefill, so cached keys stay exact. Ends with prefill time, tokens/s and
peak memory.
"""
import argparse
import resource
import sys
import time

import torch

from nanococa.checkpoint import load_model
from nanococa.errors import UserError, run_script
from nanococa.model import parse_scaling
from nanococa.trainer import resolve_device, resolve_dtype


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="out", help="checkpoint file or folder holding ckpt.pt (default: out)")
    p.add_argument("--prompt", default=None, help="prompt text (default: start a new document)")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this file (a play, a book...)")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "float64"])
    p.add_argument("--max-context", type=int, default=32768, help="largest prompt + new tokens allowed")
    p.add_argument("--rope-scaling", default="none", help="none, dynamic:F or linear:F")
    p.add_argument("--prefill-chunk", type=int, default=1024)
    return p.parse_args(argv)


def check(args):
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    if args.temperature < 0:
        raise UserError(f"--temperature={args.temperature} must be >= 0 (0 is greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k={args.top_k} must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p={args.top_p} must be in (0, 1]")
    if args.num_samples < 1 or args.prefill_chunk < 1 or args.max_context < 2:
        raise UserError("--num-samples and --prefill-chunk must be at least 1, --max-context at least 2")
    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    try:
        return parse_scaling(args.rope_scaling)
    except ValueError as e:
        raise UserError(str(e)) from None


class Streamer:
    """Prints tokens as they come; holds back an incomplete UTF-8 character until it completes."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown, self.times = tok, [], 0, []

    def __call__(self, nxt):
        self.times.append(time.perf_counter())
        self.ids.append(int(nxt[0]))
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            print(text[self.shown:], end="", flush=True)
            self.shown = len(text)

    def close(self):
        print(self.tok.decode(self.ids)[self.shown:], flush=True)


def main(argv):
    args = parse_args(argv)
    scaling = check(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tok, ckpt = load_model(args.ckpt, device, getattr(torch, dtype))
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8", errors="replace") as f:
                args.prompt = f.read()
        except OSError as e:
            raise UserError(f"--prompt-file={args.prompt_file}: {e.strerror}") from None
    if args.prompt is not None and not args.prompt:
        raise UserError("the prompt is empty; leave --prompt out to start a new document")
    ids = tok.encode(args.prompt) if args.prompt is not None else [tok.eot]
    total = len(ids) + args.max_new_tokens
    if total > args.max_context:
        raise UserError(f"prompt ({len(ids):,} tokens) + --max-new-tokens ({args.max_new_tokens:,}) = {total:,} "
                        f"exceeds --max-context={args.max_context:,}")
    cfg = model.config
    print(f"# {args.ckpt}: {cfg.attention}, {model.num_params() / 1e6:.2f}M parameters, trained at {cfg.block_size} "
          f"(iter {ckpt.get('iter', '?')}); prompt {len(ids):,} tokens, rope scaling {args.rope_scaling}; "
          f"{device} {dtype}", file=sys.stderr)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    for s in range(args.num_samples):
        if args.num_samples > 1:
            print(f"\n---------- sample {s + 1}/{args.num_samples}", flush=True)
        if args.prompt is not None and len(ids) <= 2000:
            print(args.prompt, end="", flush=True)
        streamer = Streamer(tok)
        t0 = time.perf_counter()
        model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p, scaling,
                       args.prefill_chunk, gen, on_token=streamer)
        streamer.close()
        prefill = streamer.times[0] - t0
        decode = streamer.times[-1] - streamer.times[0]
        rate = (len(streamer.times) - 1) / decode if decode > 0 else float("nan")
        if device.startswith("cuda"):
            peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on the GPU"
        else:
            peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident"
        print(f"# prefill {len(ids):,} tokens in {prefill:.2f} s ({len(ids) / prefill:,.0f} tok/s); "
              f"decode {rate:.1f} tok/s; peak memory {peak}", file=sys.stderr)


if __name__ == "__main__":
    run_script(main)
