"""Sample from a trained checkpoint with a key/value cache, up to 32K tokens of context.

    python sample.py                                   # from out/ckpt.pt, the default of train.py
    python sample.py --prompt-val-tokens=32000 --scaling=dynamic:4+logn --max-new-tokens=200
    python sample.py --ckpt=out-pycode --prompt-file=big.py --scaling=dynamic:4

The prompt is prefilled in chunks (--prefill-chunk tokens at a time, never a T x T matrix), then tokens
are decoded one at a time and streamed. With dynamic NTK the rotary base is fixed from the final length
(prompt + new tokens) before prefill, so cached keys stay exact. Ends with prefill time, tokens/s and
peak memory.
"""
import math
import resource
import sys
import time

import torch

from nanococa.checkpoint import load_model
from nanococa.common import DTYPES, method_name, resolve_device, resolve_dtype
from nanococa.data import Split, prepare
from nanococa.errors import ArgumentParser, UserError, run_script
from nanococa.model import parse_scaling


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="out", help="checkpoint file or folder holding ckpt.pt (default: out)")
    p.add_argument("--prompt", default=None, help="prompt text (default: start a new document)")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this file (a play, a book...)")
    p.add_argument("--prompt-val-tokens", type=int, default=None, metavar="N",
                   help="prompt with the first N tokens of the longest validation document of the checkpoint's corpus")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--max-context", type=int, default=32768, help="largest prompt + new tokens allowed")
    p.add_argument("--scaling", "--rope-scaling", default="none",
                   help="context extension: none, dynamic:F, linear:F, logn, or a +-joined mix (dynamic:4+logn)")
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--data-dir", default="data_cache", help="where --prompt-val-tokens finds the tokenized corpus")
    return p.parse_args(argv)


def check(args):
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    if not 0 <= args.temperature < math.inf:
        raise UserError(f"--temperature={args.temperature} must be a finite number >= 0 (0 is greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k={args.top_k} must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p={args.top_p} must be in (0, 1]")
    if args.num_samples < 1 or args.prefill_chunk < 1 or args.max_context < 2:
        raise UserError("--num-samples and --prefill-chunk must be at least 1, --max-context at least 2")
    if args.prompt_val_tokens is not None and args.prompt_val_tokens < 1:
        raise UserError(f"--prompt-val-tokens={args.prompt_val_tokens} must be at least 1")
    if sum(x is not None for x in (args.prompt, args.prompt_file, args.prompt_val_tokens)) > 1:
        raise UserError("give one of --prompt, --prompt-file and --prompt-val-tokens")
    try:
        return parse_scaling(args.scaling)
    except ValueError as e:
        raise UserError(f"--scaling: {e}") from None


def prompt_ids(args, tok, ckpt):
    """Token ids of the prompt: text, a file, or the start of the longest validation document."""
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8", errors="replace") as f:
                args.prompt = f.read()
        except OSError as e:
            raise UserError(f"--prompt-file={args.prompt_file}: {e.strerror}") from None
    if args.prompt_val_tokens is not None:
        corpus = ckpt.get("train_config", {}).get("corpus", "shakespeare")
        val = Split(prepare(corpus, tok, args.data_dir, log=lambda *a: None), "val")
        doc = max(range(len(val.names)), key=lambda i: val.doc_tokens[i])
        ids = val.document(doc)[:args.prompt_val_tokens].tolist()
        print(f"# prompt: the first {len(ids):,} tokens of {val.names[doc]} ({corpus} validation)", file=sys.stderr)
        return ids
    if args.prompt is not None and not args.prompt:
        raise UserError("the prompt is empty; leave --prompt out to start a new document")
    return tok.encode(args.prompt) if args.prompt is not None else [tok.eot]


class Streamer:
    """Prints tokens as they come; holds back an incomplete UTF-8 character until it completes."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], 0

    def add(self, token):
        self.ids.append(token)
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
    ids = prompt_ids(args, tok, ckpt)
    total = len(ids) + args.max_new_tokens
    if total > args.max_context:
        raise UserError(f"prompt ({len(ids):,} tokens) + --max-new-tokens ({args.max_new_tokens:,}) = {total:,} "
                        f"exceeds --max-context={args.max_context:,}")
    cfg = model.config
    print(f"# {args.ckpt}: {method_name(cfg.attention, cfg.attn_scale)}, "
          f"{model.num_params() / 1e6:.2f}M parameters, trained at {cfg.block_size} (iter {ckpt.get('iter', '?')}); "
          f"prompt {len(ids):,} tokens, scaling {args.scaling}; {device} {dtype}", file=sys.stderr)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    for s in range(args.num_samples):
        if args.num_samples > 1:
            print(f"\n---------- sample {s + 1}/{args.num_samples}", flush=True)
        if len(ids) <= 2000 and ids != [tok.eot]:
            print(tok.decode(ids), end="", flush=True)
        streamer, times = Streamer(tok), []
        t0 = time.perf_counter()
        for token in model.generate_stream(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                           top_p=args.top_p, scaling=scaling, prefill_chunk=args.prefill_chunk,
                                           generator=gen):
            token = int(token[0])  # waits for the device: the token is known now
            times.append(time.perf_counter())
            streamer.add(token)
        streamer.close()
        prefill, decode = times[0] - t0, times[-1] - times[0]
        rate = (len(times) - 1) / decode if decode > 0 else float("nan")
        if device.startswith("cuda"):
            peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on the GPU"
        else:
            peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident"
        print(f"# prefill {len(ids):,} tokens in {prefill:.2f} s ({len(ids) / prefill:,.0f} tok/s); "
              f"decode {rate:.1f} tok/s; peak memory {peak}", file=sys.stderr)


if __name__ == "__main__":
    run_script(main)
