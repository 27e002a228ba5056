"""python -m nanococa.bench: speed and memory of every attention path, training and 32K generation.

    python -m nanococa.bench                 # full run (meant for a GPU: N = 512 .. 32768, bf16)
    python -m nanococa.bench --quick         # a 2-core CPU in about a minute

Everything is measured side by side in one run and reported as ratios to rope-fast (attention) or to
RoPE (training, generation), so the numbers compare like with like on the machine at hand.
  attention  forward and forward+backward of rope/coca/slack/alibi fast (SDPA; ALiBi: FlexAttention on
             CUDA, chunked SDPA elsewhere), the naive paths where they fit their budget, and the anchor:
             the official code's computation (Slack with an explicit N x N einsum score matrix, masked
             softmax); out of memory is reported, not hidden.
  train      one optimizer step of a preset's model: tokens/s and MFU (on a GPU whose peak is known),
             every attention against rope, eager and compiled.
  generate   prefill of a long prompt, decode tokens/s at that context, peak memory, and decode against
             the memory-bandwidth bound (bytes of weights and cache read per token over copy bandwidth).
On CUDA: CUDA events, warm-up, several repeats, the median; peak memory from the allocator.
On CPU: wall clock, the median; peak memory is not measured (no allocator statistics).
"""
import json
import math
import os
import platform
import statistics
import time

import torch

from .common import atomic_write, gpu_peak_flops, parse_lengths, parse_scaling, resolve_device, resolve_dtype
from .config import make_config
from .errors import ArgumentParser, UserError, run_script
from .model import GPT, GPTConfig, alibi_slopes, attention, naive_attend, rotary_cos_sin, rotate, tau_of
from .sampling import timed_generation


def official_slack(q, t, v, rot, slopes):
    """The anchor: the official code's Slack attention, einsum('bpnd,bpsd,bpnd->bpns') over an N x N
    matrix."""
    tau = tau_of(t)
    scores = torch.einsum("bpnd,bpsd,bpnd->bpns", q, rotate(torch.cat((tau, tau), -1), *rot), rotate(q, *rot))
    return naive_attend(scores / math.sqrt(q.size(-1)), v)


def path(variant, impl):
    return lambda q, t, v, rot, slopes: attention(variant, impl, q, t, v, rot=rot, slopes=slopes)


# the four methods (the ladder's rungs between RoPE and CoCA run the same kernels on the same shapes)
NAMES = {"rope": "rope", "coca": "coca", "coca-slack": "slack", "alibi": "alibi"}
PATHS = {f"{NAMES[v]}-{impl}": path(v, impl) for impl in ("fast", "naive") for v in NAMES}
PATHS["official-einsum"] = official_slack


def measure(fn, device, warmup, repeats):
    """(median milliseconds, peak MiB or None) of fn()."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return statistics.median(times), peak


def guarded(fn):
    """Run fn; out of memory or a refusal becomes a status string instead of a crash."""
    try:
        return fn(), "ok"
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, "out of memory"
    except RuntimeError as e:
        if "budget" in str(e):
            return None, "over the naive budget"
        if "out of memory" in str(e).lower() or "alloc" in str(e).lower():
            return None, "out of memory"
        raise


def bench_attention(args, device, dtype, log):
    rows = []
    for N in args.lengths:
        shape = (args.batch, args.heads, N, args.head_dim)
        g = torch.Generator(device=device).manual_seed(0)
        q, t, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
        rot = rotary_cos_sin(0, N, args.head_dim, device=device, dtype=dtype)
        slopes = alibi_slopes(args.heads).to(device=device, dtype=dtype)
        grad = torch.randn(shape, generator=g, device=device, dtype=dtype)
        for name, fn in PATHS.items():
            if args.skip_slow_over and N > args.skip_slow_over and not name.endswith("-fast"):
                rows.append(dict(path=name, N=N,
                                 status=f"not run above N={args.skip_slow_over} (--skip_slow_over)"))
                continue

            def fwd():
                with torch.no_grad():
                    fn(q, t, v, rot, slopes)

            def fwdbwd():
                qq, tt, vv = (x.detach().requires_grad_() for x in (q, t, v))
                fn(qq, tt, vv, rot, slopes).backward(grad)

            r1, s1 = guarded(lambda: measure(fwd, device, args.warmup, args.repeats))
            r2, s2 = guarded(lambda: measure(fwdbwd, device, args.warmup, args.repeats)) if r1 else (None, s1)
            row = dict(path=name, N=N, status=s2 if s1 == "ok" else s1)
            if r1:
                row.update(fwd_ms=r1[0], fwd_peak_mib=r1[1])
            if r2:
                row.update(fwdbwd_ms=r2[0], fwdbwd_peak_mib=r2[1])
            rows.append(row)
            times = (f"fwd {row['fwd_ms']:9.2f} ms" if "fwd_ms" in row else "") + \
                (f"  fwd+bwd {row['fwdbwd_ms']:9.2f} ms" if "fwdbwd_ms" in row else "")
            log(f"  attention N={N:>6} {name:<16} {times}  {row['status']}")
        del q, t, v, grad
    for row in rows:  # ratios to rope-fast at the same N
        ref = next(r for r in rows if r["path"] == "rope-fast" and r["N"] == row["N"])
        for k in ("fwd_ms", "fwdbwd_ms"):
            if k in row and k in ref:
                row[k.replace("_ms", "_ratio")] = row[k] / ref[k]
    return rows


def preset_model(args):
    """(GPTConfig keywords, batch size) of the preset's model; --quick shrinks it to CPU size."""
    cfg = make_config([f"--preset={args.preset}"])
    over = dict(vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                n_embd=cfg.n_embd, bias=cfg.bias)
    if args.quick:
        over.update(vocab_size=2048, n_layer=2, n_embd=128, n_head=4, block_size=512)
    return over, 4 if args.quick else cfg.batch_size


def bench_train(args, device, dtype, log):
    rows = []
    over, batch = preset_model(args)
    cuda = device.startswith("cuda")
    for compiled in ([False, True] if args.compile else [False]):
        for att in NAMES:
            torch.manual_seed(0)
            model = GPT(GPTConfig(**over, attention=att)).to(device)
            opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.split(":")[0])
            step_model = torch.compile(model) if compiled else model
            x = torch.randint(0, over["vocab_size"], (batch, over["block_size"]), device=device)
            bf16 = cuda and dtype == torch.bfloat16
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.enable_grad()

            def step():
                with ctx:
                    _, loss = step_model(x, x)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            warmup = args.warmup + (3 if compiled else 0)
            r, status = guarded(lambda: measure(step, device, warmup, args.train_repeats))
            row = dict(attention=att, compiled=compiled, batch=batch, block_size=over["block_size"],
                       n_layer=over["n_layer"], n_embd=over["n_embd"], status=status)
            if r:
                tokens = batch * over["block_size"]
                row.update(ms_per_step=r[0], tokens_per_s=tokens / (r[0] / 1000), peak_mib=r[1],
                           mfu=model.estimate_mfu(tokens, r[0] / 1000, args.peak_flops) if args.peak_flops
                           else None)
            rows.append(row)
            log(f"  train {att:<10} {'compiled' if compiled else 'eager':<8} "
                + (f"{row['tokens_per_s'] / 1000:8.1f}k tok/s" if r else status)
                + (f"  mfu {100 * row['mfu']:.1f}%" if r and row["mfu"] else ""))
            del model, opt, step_model
    for row in rows:
        ref = next(r for r in rows if r["attention"] == "rope" and r["compiled"] == row["compiled"])
        if "tokens_per_s" in row and "tokens_per_s" in ref:
            row["tokens_per_s_ratio"] = row["tokens_per_s"] / ref["tokens_per_s"]
    return rows


def copy_bandwidth(device, nbytes):
    """Bytes per second of a large device-to-device copy (read + write)."""
    a = torch.empty(nbytes // 4, device=device, dtype=torch.float32)
    b = torch.empty_like(a)
    ms, _ = measure(lambda: b.copy_(a), device, 2, 5)
    return 2 * nbytes / (ms / 1000)


def bench_generate(args, device, dtype, log):
    over, _ = preset_model(args)
    bw = copy_bandwidth(device, 2**30 if device.startswith("cuda") else 2**27)
    rows = []
    for att in NAMES:
        torch.manual_seed(0)
        model = GPT(GPTConfig(**over, attention=att)).to(device=device, dtype=dtype).eval()
        prompt = torch.randint(0, over["vocab_size"], (1, args.prompt), device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        timing = timed_generation(model, prompt, args.new_tokens, temperature=0,
                                  scaling=parse_scaling("dynamic:4"))
        head_dim = over["n_embd"] // over["n_head"]
        per_token = sum(p.numel() * p.element_size() for p in model.parameters())
        cached = 2 * over["n_layer"] * over["n_head"] * args.prompt * head_dim  # keys, values read per token
        per_token += cached * model.lm_head.weight.element_size()
        rate = timing.decode_tokens_per_s
        row = dict(attention=att, prompt=args.prompt, new_tokens=args.new_tokens, prefill_s=timing.prefill_s,
                   decode_tokens_per_s=rate, bytes_per_token=per_token, bound_tokens_per_s=bw / per_token,
                   fraction_of_bound=rate / (bw / per_token),
                   peak_mib=torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None)
        rows.append(row)
        log(f"  generate {att:<10} prefill {args.prompt:,} in {row['prefill_s']:.2f} s, decode {rate:.1f} "
            f"tok/s ({100 * row['fraction_of_bound']:.1f}% of the bandwidth bound)")
        del model
    for row in rows:
        ref = rows[0]
        row["prefill_ratio"] = row["prefill_s"] / ref["prefill_s"]
        row["decode_ratio"] = row["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
    return rows, bw


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def print_tables(res):
    print("\nattention (ms; ratio to rope-fast at the same N)")
    print("| path | N | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio | fwd+bwd peak MiB | status |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["attention"]:
        print(f"| {r['path']} | {r['N']} | {fmt(r.get('fwd_ms'), '.2f')} | {fmt(r.get('fwd_ratio'), '.2f')} "
              f"| {fmt(r.get('fwdbwd_ms'), '.2f')} | {fmt(r.get('fwdbwd_ratio'), '.2f')} | "
              f"{fmt(r.get('fwdbwd_peak_mib'), '.0f')} | {r['status']} |")
    print("\ntraining step")
    print("| attention | compiled | tokens/s | ratio to rope | MFU | status |")
    print("|---|---|---|---|---|---|")
    for r in res["train"]:
        print(f"| {r['attention']} | {r['compiled']} | {fmt(r.get('tokens_per_s'), ',.0f')} | "
              f"{fmt(r.get('tokens_per_s_ratio'), '.3f')} | {fmt(r.get('mfu') and 100 * r['mfu'], '.1f')} | "
              f"{r['status']} |")
    print(f"\ngeneration (copy bandwidth {res['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s)")
    print("| attention | prompt | prefill s | decode tok/s | bound tok/s | of bound | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in res["generate"]:
        print(f"| {r['attention']} | {r['prompt']} | {r['prefill_s']:.2f} | {r['decode_tokens_per_s']:.1f} | "
              f"{r['bound_tokens_per_s']:.0f} | {100 * r['fraction_of_bound']:.1f}% | "
              f"{fmt(r['peak_mib'], '.0f')} |")


FULL = dict(lengths="512,1K,2K,4K,8K,16K,32K", heads=12, prompt=32768, new_tokens=64, warmup=3, repeats=10,
            train_repeats=10)
# --quick keeps 4 heads and 512 tokens: there ALiBi's steepest slope (1/4) spreads a row's logits over
# 128 nats, so some softmax weights fall among float32's denormal numbers (e^-87 .. e^-103), the slow
# case of a CPU's SDPA backward that training at 512 meets and a smaller size would hide
QUICK = dict(lengths="128,256,512", heads=4, prompt=1024, new_tokens=8, warmup=1, repeats=3, train_repeats=2)


def parse_args(argv):
    p = ArgumentParser(prog="python -m nanococa.bench",
                       description="nanococa benchmarks: attention, training step, generation")
    p.add_argument("--quick", action="store_true", help="small sizes: a 2-core CPU in under 2 minutes")
    p.add_argument("--device", default="auto")
    p.add_argument("--lengths", default=None,
                   help=f"attention N list (default {FULL['lengths']}; --quick {QUICK['lengths']})")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None,
                   help=f"attention heads (default {FULL['heads']}; --quick {QUICK['heads']})")
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--preset", default="pycode-gpu",
                   help="model shape for the training and generation sections")
    p.add_argument("--prompt", type=int, default=None,
                   help=f"generation: prompt tokens (default {FULL['prompt']})")
    p.add_argument("--new_tokens", type=int, default=None,
                   help=f"generation: new tokens (default {FULL['new_tokens']})")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--train_repeats", type=int, default=None)
    p.add_argument("--no_compile", dest="compile", action="store_false", help="training: eager only")
    p.add_argument("--skip_slow_over", type=int, default=0,
                   help="run naive and anchor paths only up to this N")
    p.add_argument("--peak_flops", type=float, default=None,
                   help="dense bf16 peak FLOP/s for MFU (default: the GPU's own where known, else no MFU)")
    p.add_argument("--out", default="bench.json")
    return p.parse_args(argv)


def check_args(args, cuda):
    """Fill the size defaults (--quick's or the full ones; options given explicitly win) and refuse sizes
    that cannot be meant. Returns the --quick settings that were applied, to print."""
    sizes = QUICK if args.quick else FULL
    applied = {k: v for k, v in sizes.items() if getattr(args, k) is None}
    for k, v in applied.items():
        setattr(args, k, v)
    if args.quick and args.compile and not cuda:
        args.compile, applied["compile"] = False, False
    try:
        args.lengths = parse_lengths(args.lengths)
    except ValueError as e:
        raise UserError(f"--lengths: {e}") from None
    for k in ("batch", "heads", "head_dim", "prompt", "repeats", "train_repeats"):
        if getattr(args, k) < 1:
            raise UserError(f"--{k}={getattr(args, k)} must be at least 1")
    if args.warmup < 0 or args.skip_slow_over < 0:
        raise UserError("--warmup and --skip_slow_over must not be negative")
    if args.head_dim % 2:
        raise UserError(f"--head_dim={args.head_dim} is odd; rotary needs an even head dimension")
    if args.new_tokens < 2:
        raise UserError("--new_tokens must be at least 2 (decode speed is timed between the first and the "
                        "last)")
    if args.peak_flops is not None and not 0 < args.peak_flops < math.inf:
        raise UserError(f"--peak_flops={args.peak_flops} must be a positive number")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out) or not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise UserError(f"--out={args.out} cannot be written (a folder, or its folder is missing or "
                        "read-only)")
    if os.path.exists(args.out) and not is_bench_result(args.out):
        raise UserError(f"--out={args.out} exists and is not a benchmark result: it is left alone; choose "
                        "another --out")
    return applied


def cpu_name():
    """The processor's model name (Linux: /proc/cpuinfo), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def is_bench_result(path):
    """True when path holds a JSON result of this benchmark (the only kind of file --out may replace)."""
    try:
        with open(path) as f:
            return {"meta", "attention", "train", "generate"} <= set(json.load(f))
    except (OSError, ValueError, TypeError):
        return False


def main(argv):
    args = parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    applied = check_args(args, cuda)
    make_config([f"--preset={args.preset}"])  # an unknown preset is an error now, not after the attention
    dtype = getattr(torch, resolve_dtype("auto", device))
    gpu = torch.cuda.get_device_name(device) if cuda else None
    if args.peak_flops is None and gpu:
        args.peak_flops = gpu_peak_flops(gpu)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    log = lambda m: print(m, flush=True)  # noqa: E731
    machine = gpu or cpu_name()
    log(f"nanococa.bench on {machine} ({device}, {dtype}, torch "
        f"{torch.__version__}); B={args.batch} H={args.heads} D={args.head_dim}"
        + (f"; MFU against {args.peak_flops / 1e12:.0f} TFLOP/s" if args.peak_flops
           else "; no MFU (unknown peak)"))
    if args.quick:
        log("--quick sets " + (", ".join(f"{k}={v}" for k, v in applied.items()) or "nothing")
            + "; options given on the command line are kept")
    res = dict(meta=dict(device=device, gpu=gpu, machine=machine, cpu=cpu_name(), cores=os.cpu_count(),
                         threads=torch.get_num_threads(), dtype=str(dtype), torch=torch.__version__,
                         quick=args.quick, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                         preset=args.preset, warmup=args.warmup, repeats=args.repeats,
                         peak_flops=args.peak_flops))
    res["attention"] = bench_attention(args, device, dtype, log)
    res["train"] = bench_train(args, device, dtype, log)
    res["generate"], res["copy_bandwidth_bytes_per_s"] = bench_generate(args, device, dtype, log)
    atomic_write(args.out, lambda f: json.dump(res, f, indent=1), mode="w", what="benchmark result")
    print_tables(res)
    print(f"\nwrote {args.out}")
    return res


if __name__ == "__main__":
    run_script(main)
