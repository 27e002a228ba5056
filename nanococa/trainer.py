"""The training loop behind train.py, nanoGPT-style.

AdamW (fused on CUDA), linear warm-up then cosine decay, gradient accumulation and clipping, bf16
autocast on CUDA, optional torch.compile, several processes through torchrun + DDP (NCCL on GPU,
gloo on CPU). Every eval_interval steps and at the end: train/val loss, optionally same-targets
perplexity at longer contexts (--eval_lengths), and an atomic checkpoint (model, optimizer, configs,
tokenizer name, step, RNG states); --resume continues exactly there, --init_from starts a new run
from another checkpoint's weights. Console: a progress line every log_interval steps.
<out_dir>/log.jsonl: one JSON record per line.

Nothing saved is lost: a fresh run refuses an out_dir holding a checkpoint (unless --overwrite), two
runs cannot share an out_dir, and a step whose loss or weights are not finite stops the run before
it can replace the last good checkpoint.
"""
import dataclasses
import hashlib
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint
from .common import fmt_time, file_lock, method_name, peak_flops, resolve_device, resolve_dtype
from .config import FIXED_ON_RESUME
from .data import Split, prepare
from .errors import UserError
from .evaluate import pick_windows, same_targets_perplexity
from .model import GPT, GPTConfig
from .tokenizer import get_tokenizer


@dataclasses.dataclass
class Processes:
    """Where this process runs: DDP rank and world size, device, dtype and the autocast to use."""
    ddp: bool
    rank: int
    local_rank: int
    world: int
    device: str
    dtype: str

    @property
    def master(self):
        return self.rank == 0

    @property
    def device_type(self):
        return self.device.split(":")[0]

    def autocast(self):
        if self.dtype == "float32":
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=getattr(torch, self.dtype))


def setup_processes(cfg):
    """Resolve device and dtype; under torchrun, join the process group."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, local_rank, world = 0, 0, 1
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if cfg.grad_accum % world:
        raise UserError(f"--grad_accum={cfg.grad_accum} must be a multiple of the {world} processes")
    device = resolve_device(cfg.device, local_rank)
    procs = Processes(ddp, rank, local_rank, world, device, resolve_dtype(cfg.dtype, device))
    if ddp:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if procs.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return procs


def check_out_dir(cfg):
    """Before any long work: out_dir must be a writable folder, and a fresh run must not replace a
    checkpoint that is there unless asked to."""
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise UserError(f"--out_dir={cfg.out_dir} is a file, not a folder")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out_dir={cfg.out_dir} cannot be created ({e.strerror})") from None
    if not os.access(cfg.out_dir, os.W_OK | os.X_OK):
        raise UserError(f"--out_dir={cfg.out_dir} is not writable")
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not cfg.resume and not cfg.overwrite and os.path.exists(ckpt_path):
        raise UserError(f"{ckpt_path} exists: continue it with --resume, replace it with --overwrite, "
                        "or choose another --out_dir")


def load_data(cfg, procs, tok, say):
    """Tokenize the corpus once (the master first; the others then reuse its cache) and check that both
    splits are long enough for the context and the tracked lengths before training starts."""
    if procs.master:
        folder = prepare(cfg.corpus, tok, cfg.data_dir, log=say)
    if procs.ddp:
        dist.barrier()
    if not procs.master:
        folder = prepare(cfg.corpus, tok, cfg.data_dir, log=lambda *a: None)
    splits = {s: Split(folder, s) for s in ("train", "val")}
    for name, split in splits.items():
        if len(split) <= cfg.block_size + 1:
            raise UserError(f"corpus {cfg.corpus}: the {name} split has {len(split):,} tokens, too few for "
                            f"--block_size={cfg.block_size}")
    lengths = cfg.tracked_lengths()
    windows = pick_windows(splits["val"], max(lengths), min(lengths + [512]), cfg.eval_windows) if lengths else []
    return splits, windows


def compare_with_checkpoint(cfg, ckpt, saved_model, path):
    """--resume: fields that define the model or its data must match the checkpoint (a UserError names
    those that do not); the others may change, and come back as [(field, old, new)] to report."""
    saved = {**ckpt.get("train_config", {}), **saved_model, "tokenizer": ckpt["tokenizer"]}
    mine = dataclasses.asdict(cfg)
    fixed = [f"{k}={saved[k]!r} there, {mine[k]!r} here" for k in FIXED_ON_RESUME if k in saved and saved[k] != mine[k]]
    if fixed:
        hint = f" (it was trained with --preset={saved['preset']})" if saved.get("preset", cfg.preset) != cfg.preset else ""
        raise UserError(f"--resume: {path} differs from this run in {'; '.join(fixed)}{hint}; give the run's own "
                        "options, or start a new run (--init_from to reuse its weights)")
    skip = set(FIXED_ON_RESUME) | {"resume", "overwrite", "init_from"}
    return [(k, saved[k], v) for k, v in mine.items() if k in saved and k not in skip and saved[k] != v]


def build_model(cfg, procs, tok, say):
    """Model and optimizer: fresh, resumed from out_dir/ckpt.pt, or started from --init_from's weights.
    Returns (model, optimizer, state) with state the step, the RNG states to restore and the source.
    Every check on the checkpoints comes before any data is prepared."""
    ckpt, ckpt_path, state = None, os.path.join(cfg.out_dir, "ckpt.pt"), {"iter": 0}
    if cfg.resume:
        ckpt = checkpoint.load(ckpt_path)
        saved_model = dataclasses.asdict(checkpoint.model_config(ckpt, ckpt_path))
        changes = compare_with_checkpoint(cfg, ckpt, saved_model, ckpt_path)
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(**cfg.model_args()))
    if ckpt is not None:
        checkpoint.load_weights(model, ckpt["model"], ckpt_path)
        missing = {"optimizer", "rng", "iter"} - set(ckpt)
        if missing:
            raise UserError(f"--resume: {ckpt_path} has no {', '.join(sorted(missing))}: it is not a training state to "
                            "continue; start a new run from its weights with --init_from")
        for key, old, new in changes:
            say(f"resume: {key} {old!r} -> {new!r}")
        state.update(iter=ckpt["iter"], rng=ckpt["rng"], source=ckpt.get("init_from"))
    elif cfg.init_from:
        src = checkpoint.load(cfg.init_from)
        if src["tokenizer"] != tok.name:
            raise UserError(f"--init_from={cfg.init_from} was trained with tokenizer {src['tokenizer']}, "
                            f"this run uses {tok.name}")
        fresh = checkpoint.convert_weights(model, src["model"], cfg.init_from)
        state["source"] = dict(path=cfg.init_from, iter=src.get("iter"), attention=src["model_args"].get("attention"),
                               attn_scale=src["model_args"].get("attn_scale", "none"))
        say(f"init_from: {cfg.init_from} (iter {src.get('iter')}, {state['source']['attention']}) -> "
            f"{cfg.attention}" + (f"; new: {', '.join(fresh)}" if fresh else ""))
    model.to(procs.device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           procs.device_type)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        say(f"resumed from {ckpt_path} at iter {state['iter']}")
    return model, optimizer, state


def lr_at(it, cfg):
    """Linear warm-up to learning_rate, then cosine down to min_lr at lr_decay_iters (default max_iters)."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def estimate_losses(model, splits, cfg, procs):
    """Mean loss over eval_iters batches of each split, the same windows at every evaluation."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    out = {}
    for name, split in splits.items():
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            x, y = split.batch(cfg.batch_size, cfg.block_size, gen, procs.device)
            with procs.autocast():
                losses[k] = model(x, y)[1].item()
        out[name] = losses.mean().item()
    model.train()
    return out


@torch.no_grad()
def length_perplexities(model, split, windows, lengths, procs):
    """{length: same-targets perplexity} on the fixed validation windows (--eval_lengths)."""
    model.eval()
    target = min(lengths + [512])
    with procs.autocast():
        out = {n: same_targets_perplexity(model, split, windows, n, target, device=procs.device)[0] for n in lengths}
    model.train()
    return out


def weights_fingerprint(model):
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def short(n):
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def train(cfg, log=print):
    """Run one training job described by a TrainConfig; return a summary dict."""
    procs = setup_processes(cfg)
    say = log if procs.master else (lambda *a, **k: None)
    if procs.master:
        check_out_dir(cfg)
    busy = f"another training run is writing to --out_dir={cfg.out_dir}; wait for it or choose another folder"
    with file_lock(os.path.join(cfg.out_dir, ".lock"), wait=False, busy_message=busy) if procs.master else nullcontext():
        if procs.master:
            for path in checkpoint.remove_stale_temporaries(cfg.out_dir):
                say(f"removed {path}, a half-written checkpoint left by a killed run")
        return train_locked(cfg, procs, say)


def train_locked(cfg, procs, say):
    tok = get_tokenizer(cfg.tokenizer)
    raw_model, optimizer, state = build_model(cfg, procs, tok, say)
    splits, windows = load_data(cfg, procs, tok, say)
    lengths = cfg.tracked_lengths()
    iter_num = state["iter"]
    batch_gen = torch.Generator().manual_seed(cfg.seed + 1000 * procs.rank)
    torch.manual_seed(cfg.seed + procs.rank)  # dropout differs across processes
    if "rng" in state:
        batch_gen.set_state(state["rng"]["batch"][procs.rank % len(state["rng"]["batch"])])
        torch.set_rng_state(state["rng"]["torch"][procs.rank % len(state["rng"]["torch"])])
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if procs.ddp:
        model = DDP(model, device_ids=[procs.local_rank] if procs.device_type == "cuda" else None)
    scaler = torch.amp.GradScaler(procs.device_type, enabled=procs.dtype == "float16")
    accum = cfg.grad_accum // procs.world
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")

    def gather(obj):
        if not procs.ddp:
            return [obj]
        objs = [None] * procs.world
        dist.all_gather_object(objs, obj)
        return objs

    def save_checkpoint(val_loss):
        rng = {"batch": gather(batch_gen.get_state()), "torch": gather(torch.get_rng_state())}
        if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
            raise UserError(f"step {iter_num}: the weights are not finite; {ckpt_path} keeps the last good "
                            "checkpoint (try a lower --learning_rate)")
        if procs.master:
            checkpoint.save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                             "model_args": cfg.model_args(), "train_config": dataclasses.asdict(cfg),
                             "tokenizer": tok.name, "iter": iter_num, "val_loss": val_loss, "rng": rng,
                             "init_from": state.get("source")}, ckpt_path)

    jsonl = None
    if procs.master:  # a fresh run (or --overwrite) starts a new log; --resume appends to its own
        jsonl = open(os.path.join(cfg.out_dir, "log.jsonl"), "a" if cfg.resume else "w")

    def record(**kw):
        if jsonl:
            jsonl.write(json.dumps(kw) + "\n")
            jsonl.flush()

    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.grad_accum
    say(f"model: {method_name(cfg.attention, cfg.attn_scale)}, {raw_model.num_params() / 1e6:.2f}M "
        f"parameters, {cfg.n_layer} layers x {cfg.n_embd}, context {cfg.block_size}; device {procs.device} "
        f"({procs.dtype}){f', {procs.world} processes' if procs.ddp else ''}; {tokens_per_iter:,} tokens per step; "
        f"steps {iter_num} -> {cfg.max_iters}")
    if windows:
        say(f"tracking same-targets perplexity at {', '.join(map(short, lengths))} on {len(windows)} validation "
            f"windows x {min(lengths + [512])} targets")
    record(event="start", iter=iter_num, config=dataclasses.asdict(cfg), params=raw_model.num_params(),
           world=procs.world, init_from=state.get("source"))

    def evaluate_and_save():
        t_eval = time.time()
        losses = estimate_losses(model, splits, cfg, procs)
        ppl = length_perplexities(raw_model, splits["val"], windows, lengths, procs) if windows and procs.master else {}
        save_checkpoint(losses["val"])
        say(f"eval  {iter_num:>6} | train {losses['train']:.4f} | val {losses['val']:.4f}"
            + "".join(f" | ppl@{short(n)} {p:.2f}" for n, p in ppl.items())
            + f" | {time.time() - t_eval:.1f} s | saved {ckpt_path}")
        record(event="eval", iter=iter_num, train_loss=losses["train"], val_loss=losses["val"],
               ppl_at_length={str(n): p for n, p in ppl.items()}, eval_s=time.time() - t_eval)
        return losses["val"]

    peak = peak_flops(procs.device)
    t_start = t_last = time.time()
    last_val = None
    model.train()
    while iter_num < cfg.max_iters:
        # this step's learning rate: linear warm-up, then cosine decay
        lr = lr_at(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # forward and backward over the micro-batches; gradients add up (DDP syncs on the last one only)
        loss_sum = 0.0
        for micro in range(accum):
            x, y = splits["train"].batch(cfg.batch_size, cfg.block_size, batch_gen, procs.device)
            sync = model.no_sync() if procs.ddp and micro < accum - 1 else nullcontext()
            with sync:
                with procs.autocast():
                    _, loss = model(x, y)
                scaler.scale(loss / accum).backward()
            loss_sum += loss.item() / accum
        if not math.isfinite(loss_sum):  # stop before this step can reach a checkpoint
            raise UserError(f"step {iter_num + 1}: the loss is {loss_sum} (not finite); {ckpt_path} keeps the last "
                            "good checkpoint (try a lower --learning_rate or --grad_clip=1)")
        # clip the gradient norm (unscaled first when float16 scales the loss)
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        # step the optimizer, then drop the gradients
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1

        # progress line: loss, learning rate, speed, MFU (on a GPU we know), time left
        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            if procs.device_type == "cuda":
                torch.cuda.synchronize()
            now = time.time()
            steps = (iter_num - 1) % cfg.log_interval + 1
            dt, t_last = (now - t_last) / steps, now
            mfu = raw_model.estimate_mfu(tokens_per_iter, dt, peak) if peak else None
            say(f"iter {iter_num:>6}/{cfg.max_iters} | loss {loss_sum:.4f} | lr {lr:.2e} | {dt * 1000:.0f} ms/step | "
                f"{tokens_per_iter / dt / 1000:.1f}k tok/s" + (f" | mfu {100 * mfu:.1f}%" if mfu else "")
                + f" | eta {fmt_time((cfg.max_iters - iter_num) * dt)}")
            record(event="train", iter=iter_num, loss=loss_sum, lr=lr, ms_per_step=dt * 1000,
                   tokens_per_s=tokens_per_iter / dt, mfu=mfu)
        # evaluate, track longer contexts, checkpoint
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
            last_val = evaluate_and_save()
            t_last = time.time()  # evaluation time is not training time
    if iter_num == 0:  # --max_iters=0: the fresh (or converted) model is evaluated and saved as it is
        last_val = evaluate_and_save()

    summary = dict(iters=iter_num, val_loss=last_val, seconds=time.time() - t_start, out_dir=cfg.out_dir)
    if procs.ddp:
        prints = gather(weights_fingerprint(raw_model))
        summary["rank_fingerprints"] = prints
        if len(set(prints)) != 1:
            raise RuntimeError(f"DDP ranks ended with different weights: {prints}")
        say(f"ddp: weights identical on all {procs.world} processes (fingerprint {prints[0]})")
        dist.destroy_process_group()
    record(event="end", **summary)
    if jsonl:
        jsonl.close()
    say(f"done: {iter_num} steps in {fmt_time(summary['seconds'])}" +
        (f", val loss {last_val:.4f}" if last_val is not None else "") + f"; checkpoint {ckpt_path}")
    return summary
