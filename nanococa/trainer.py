"""The training loop behind train.py, nanoGPT-style.

AdamW (fused on CUDA), linear warm-up then cosine decay, gradient accumulation and clipping, bf16
autocast on CUDA, optional torch.compile, several processes through torchrun + DDP (NCCL on GPU,
gloo on CPU). Every eval_interval steps and at the end: train/val loss and an atomic checkpoint
(model, optimizer, configs, tokenizer name, step, RNG states); --resume continues exactly there.
Console: a progress line every log_interval steps. <out_dir>/log.jsonl: one JSON record per line.
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
from .data import Split, prepare
from .errors import UserError
from .model import GPT, GPTConfig
from .tokenizer import get_tokenizer

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def resolve_device(name, local_rank=0):
    if name == "auto":
        if torch.cuda.is_available():
            return f"cuda:{local_rank}"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name}: CUDA is not available here; use --device=cpu")
    return f"cuda:{local_rank}" if name == "cuda" else name


def resolve_dtype(name, device):
    """"auto" is bf16 on CUDA and float32 elsewhere; any other name is taken as given."""
    if name == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return name


def peak_flops(device):
    if not device.startswith("cuda"):
        return None
    gpu = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), 989e12)


def lr_at(it, cfg):
    """Linear warm-up to learning_rate, then cosine down to min_lr at lr_decay_iters (default max_iters)."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def weights_fingerprint(model):
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def fmt_time(s):
    m, s = divmod(int(round(s)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def train(cfg, log=print):
    """Run one training job described by a TrainConfig; return a summary dict."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, local_rank, world = 0, 0, 1
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = resolve_device(cfg.device, local_rank)
    if ddp:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    master = rank == 0
    say = log if master else (lambda *a, **k: None)
    if cfg.grad_accum % world:
        raise UserError(f"--grad_accum={cfg.grad_accum} must be a multiple of the {world} processes")
    accum = cfg.grad_accum // world
    device_type = device.split(":")[0]
    dtype = resolve_dtype(cfg.dtype, device)
    ptdtype = getattr(torch, dtype)
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # data: the master tokenizes (once, cached); the others wait, then reuse it
    tok = get_tokenizer(cfg.tokenizer)
    if master:
        folder = prepare(cfg.corpus, tok, cfg.data_dir, log=say)
    if ddp:
        dist.barrier()
    if not master:
        folder = prepare(cfg.corpus, tok, cfg.data_dir, log=lambda *a: None)
    splits = {s: Split(folder, s) for s in ("train", "val")}

    # model, optimizer, and the state to resume
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    model_args = dict(vocab_size=64 * math.ceil(tok.vocab_size / 64), block_size=cfg.block_size,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout,
                      bias=cfg.bias, attention=cfg.attention)
    ckpt = None
    if cfg.resume:
        ckpt = checkpoint.load(ckpt_path)
        if ckpt["tokenizer"] != tok.name:
            raise UserError(f"{ckpt_path} was trained with tokenizer {ckpt['tokenizer']}, not {tok.name}")
        model_args = ckpt["model_args"]
    torch.manual_seed(cfg.seed)
    try:
        gptconf = GPTConfig(**model_args)
    except ValueError as e:
        raise UserError(str(e)) from None
    model = GPT(gptconf).to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    batch_gen = torch.Generator().manual_seed(cfg.seed + 1000 * rank)
    torch.manual_seed(cfg.seed + rank)  # dropout differs across processes
    iter_num, best_val = 0, float("inf")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, best_val = ckpt["iter"], ckpt["best_val_loss"]
        batch_gen.set_state(ckpt["rng"]["batch"][rank % len(ckpt["rng"]["batch"])])
        torch.set_rng_state(ckpt["rng"]["torch"][rank % len(ckpt["rng"]["torch"])])
        say(f"resumed from {ckpt_path} at iter {iter_num}")
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")

    @torch.no_grad()
    def evaluate():
        model.eval()
        gen = torch.Generator().manual_seed(cfg.seed + 7)  # the same windows at every evaluation
        out = {}
        for name, split in splits.items():
            losses = torch.zeros(cfg.eval_iters)
            for k in range(cfg.eval_iters):
                x, y = split.batch(cfg.batch_size, cfg.block_size, gen, device)
                with autocast:
                    losses[k] = model(x, y)[1].item()
            out[name] = losses.mean().item()
        model.train()
        return out

    def gather_rng(state):
        if not ddp:
            return [state]
        states = [None] * world
        dist.all_gather_object(states, state)
        return states

    def save_checkpoint():
        rng = {"batch": gather_rng(batch_gen.get_state()), "torch": gather_rng(torch.get_rng_state())}
        if master:
            checkpoint.save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                             "model_args": dataclasses.asdict(gptconf), "train_config": dataclasses.asdict(cfg),
                             "tokenizer": tok.name, "iter": iter_num, "best_val_loss": best_val, "rng": rng},
                            ckpt_path)

    os.makedirs(cfg.out_dir, exist_ok=True)
    jsonl = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if master else None

    def record(**kw):
        if jsonl:
            jsonl.write(json.dumps(kw) + "\n")
            jsonl.flush()

    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.grad_accum
    say(f"model: {cfg.attention}, {raw_model.num_params() / 1e6:.2f}M parameters, {cfg.n_layer} layers x {cfg.n_embd}, "
        f"context {cfg.block_size}; device {device} ({dtype}){f', {world} processes' if ddp else ''}; "
        f"{tokens_per_iter:,} tokens per step; steps {iter_num} -> {cfg.max_iters}")
    record(event="start", iter=iter_num, config=dataclasses.asdict(cfg), params=raw_model.num_params(), world=world)
    model.train()
    peak = peak_flops(device)
    t_start, t_last, last_val = time.time(), time.time(), None
    while iter_num < cfg.max_iters:
        lr = lr_at(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(accum):
            x, y = splits["train"].batch(cfg.batch_size, cfg.block_size, batch_gen, device)
            sync = nullcontext() if not ddp or micro == accum - 1 else model.no_sync()
            with sync:
                with autocast:
                    _, loss = model(x, y)
                scaler.scale(loss / accum).backward()
            loss_sum += loss.item() / accum
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1

        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            if device_type == "cuda":
                torch.cuda.synchronize()
            now = time.time()
            n_iters = cfg.log_interval if iter_num % cfg.log_interval == 0 else iter_num % cfg.log_interval
            dt = (now - t_last) / n_iters
            t_last = now
            tok_s = tokens_per_iter / dt
            mfu = raw_model.estimate_mfu(tokens_per_iter, dt, peak) if peak else None
            eta = (cfg.max_iters - iter_num) * dt
            say(f"iter {iter_num:>6}/{cfg.max_iters} | loss {loss_sum:.4f} | lr {lr:.2e} | {dt * 1000:.0f} ms/step | "
                f"{tok_s / 1000:.1f}k tok/s" + (f" | mfu {100 * mfu:.1f}%" if mfu else "") + f" | eta {fmt_time(eta)}")
            record(event="train", iter=iter_num, loss=loss_sum, lr=lr, ms_per_step=dt * 1000, tokens_per_s=tok_s, mfu=mfu)
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
            losses = evaluate()
            last_val, best_val = losses["val"], min(best_val, losses["val"])
            save_checkpoint()
            say(f"eval  {iter_num:>6} | train {losses['train']:.4f} | val {losses['val']:.4f} | saved {ckpt_path}")
            record(event="eval", iter=iter_num, train_loss=losses["train"], val_loss=losses["val"])
            t_last = time.time()  # evaluation time is not training time

    summary = dict(iters=iter_num, val_loss=last_val, seconds=time.time() - t_start, out_dir=cfg.out_dir)
    if ddp:
        prints = [None] * world
        dist.all_gather_object(prints, weights_fingerprint(raw_model))
        summary["rank_fingerprints"] = prints
        if len(set(prints)) != 1:
            raise RuntimeError(f"DDP ranks ended with different weights: {prints}")
        say(f"ddp: weights identical on all {world} processes (fingerprint {prints[0]})")
        dist.destroy_process_group()
    record(event="end", **summary)
    if jsonl:
        jsonl.close()
    say(f"done: {iter_num} steps in {fmt_time(summary['seconds'])}" +
        (f", val loss {last_val:.4f}" if last_val is not None else "") + f"; checkpoint {ckpt_path}")
    return summary
