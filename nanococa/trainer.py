"""The training loop behind train.py, nanoGPT-style.

AdamW (fused on CUDA), linear warm-up then cosine decay, gradient accumulation and clipping, bf16
autocast on CUDA, optional torch.compile, several processes through torchrun + DDP (NCCL on GPU,
gloo on CPU). Every eval_interval steps and at the end: train/val loss, optionally same-targets
perplexity at longer contexts (--eval_lengths) and passkey accuracy at block_size (--passkey_mix), and
an atomic checkpoint (model, optimizer, configs, tokenizer name, step, RNG states); --resume continues
exactly there, --init_from starts a new run from another checkpoint's weights. Console: a progress line
every log_interval steps. <out_dir>/log.jsonl: one JSON record per line.

Everything a run holds is in one Run (model, optimizer, data, step, ...); the functions below take it
and the loop in train_loop() is the whole story, step by step.

Nothing saved is lost: a fresh run refuses an out_dir holding a checkpoint (unless --overwrite), two
runs cannot share an out_dir, and a step whose loss or weights are not finite stops the run before it
can replace the last good checkpoint.
"""
import dataclasses
import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint, passkey
from .common import file_lock, fmt_time, method_name, peak_flops, resolve_device, resolve_dtype
from .data import Split, prepare, training_positions
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


@dataclasses.dataclass
class Run:
    """One training run: what the loop reads and changes, in the open."""
    cfg: object  # the TrainConfig
    procs: Processes
    tok: object
    raw_model: GPT  # the model itself: checkpoints, evaluation
    model: torch.nn.Module  # what the loop calls: raw_model, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    splits: dict  # "train", "val": data.Split
    windows: list  # fixed validation windows for --eval_lengths
    batch_gen: torch.Generator  # draws every batch (and every passkey row): saved, so resume is exact
    iter_num: int
    source: Optional[dict]  # where --init_from's weights came from
    fingerprint: str  # of the corpus the run trains on
    passkey_reached: Optional[int]  # the first evaluation at which passkey accuracy reached --passkey_stop
    say: Callable  # prints (on the master process only)
    jsonl: object  # log.jsonl, open for appending (master only)

    @property
    def ckpt_path(self):
        return os.path.join(self.cfg.out_dir, "ckpt.pt")


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
    if procs.device_type == "cpu" and cfg.flush_denormal:
        torch.set_flush_denormal(True)  # see TrainConfig.flush_denormal
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


def build_model(cfg, procs, tok, say):
    """Model and optimizer: fresh, resumed from out_dir/ckpt.pt, or started from --init_from's weights.
    Returns (model, optimizer, state) with state the step, the RNG states to restore, the source and the
    data fingerprint of the checkpoint. Every check on the checkpoints comes before any data is prepared."""
    ckpt, ckpt_path, state = None, os.path.join(cfg.out_dir, "ckpt.pt"), {"iter": 0}
    if cfg.resume:
        ckpt = checkpoint.load(ckpt_path)
        checkpoint.check_weights(checkpoint.model_config(ckpt, ckpt_path), ckpt["model"], ckpt_path)
        checkpoint.check_training_state(ckpt, ckpt_path)
        changes = checkpoint.resume_changes(cfg, ckpt, ckpt_path)
    torch.manual_seed(cfg.seed)
    if ckpt is not None:
        model = checkpoint.build_model(GPTConfig(**cfg.model_args()), ckpt["model"], ckpt_path)
        for key, old, new in changes:
            say(f"resume: {key} {old!r} -> {new!r}")
        state.update(iter=ckpt["iter"], rng=ckpt["rng"], source=ckpt.get("init_from"),
                     fingerprint=ckpt.get("data_fingerprint"), passkey_reached=ckpt.get("passkey_reached"))
    else:
        model = GPT(GPTConfig(**cfg.model_args()))
    if cfg.init_from:
        src = checkpoint.init_source(cfg.init_from, cfg, tok)
        fresh = checkpoint.convert_weights(model, src["model"], cfg.init_from)
        state["source"] = dict(path=cfg.init_from, iter=src.get("iter"), attention=src["model_args"].get("attention"),
                               attn_scale=src["model_args"].get("attn_scale", "none"))
        say(f"init_from: {cfg.init_from} (iter {src.get('iter')}, {state['source']['attention']}) -> "
            f"{cfg.attention}" + (f"; new: {', '.join(fresh)}" if fresh else ""))
    model.to(procs.device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           procs.device_type)
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"--resume: {ckpt_path}: its optimizer state does not fit the model ({e})") from None
        say(f"resumed from {ckpt_path} at iter {state['iter']}")
    return model, optimizer, state


def load_data(cfg, procs, tok, say):
    """Tokenize the corpus once (the master first; the others then reuse its cache) and check that both
    splits are long enough for the context and the tracked lengths before training starts.
    Returns (splits, windows for --eval_lengths, the corpus fingerprint)."""
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
    windows = pick_windows(splits["val"], max(lengths), min(lengths + [512]), cfg.eval_windows, "--eval_lengths") \
        if lengths else []
    return splits, windows, splits["train"].fingerprint


def start_run(cfg, procs, say):
    """Everything before the first step: tokenizer, model and optimizer (fresh, resumed or converted), the
    passkey check, data, RNG states, compile and DDP, the log file and the opening lines."""
    tok = get_tokenizer(cfg.tokenizer)
    raw_model, optimizer, state = build_model(cfg, procs, tok, say)
    if cfg.passkey_mix > 0 and passkey.min_length(tok) > cfg.block_size:
        raise UserError(f"--passkey_mix: a passkey text needs {passkey.min_length(tok)} tokens with {tok.name}, "
                        f"more than --block_size={cfg.block_size}")
    splits, windows, fingerprint = load_data(cfg, procs, tok, say)
    if state.get("fingerprint") and state["fingerprint"] != fingerprint:
        say(f"resume: the corpus {cfg.corpus} changed since this run started (fingerprint {state['fingerprint']} -> "
            f"{fingerprint}); the run goes on with the new data, so it is no longer an exact continuation")
    batch_gen = torch.Generator().manual_seed(cfg.seed + 1000 * procs.rank)
    torch.manual_seed(cfg.seed + procs.rank)  # dropout differs across processes
    if "rng" in state:
        batch_gen.set_state(state["rng"]["batch"][procs.rank % len(state["rng"]["batch"])])
        torch.set_rng_state(state["rng"]["torch"][procs.rank % len(state["rng"]["torch"])])
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if procs.ddp:
        model = DDP(model, device_ids=[procs.local_rank] if procs.device_type == "cuda" else None)
    jsonl = None
    if procs.master:  # a fresh run (or --overwrite) starts a new log; --resume appends to its own
        jsonl = open(os.path.join(cfg.out_dir, "log.jsonl"), "a" if cfg.resume else "w")
    run = Run(cfg, procs, tok, raw_model, model, optimizer,
              torch.amp.GradScaler(procs.device_type, enabled=procs.dtype == "float16"), splits, windows, batch_gen,
              state["iter"], state.get("source"), fingerprint, state.get("passkey_reached"), say, jsonl)
    say(f"model: {method_name(cfg.attention, cfg.attn_scale)}, {raw_model.num_params() / 1e6:.2f}M parameters, "
        f"{cfg.n_layer} layers x {cfg.n_embd}, context {cfg.block_size}; device {procs.device} ({procs.dtype})"
        f"{f', {procs.world} processes' if procs.ddp else ''}; {tokens_per_step(cfg):,} tokens per step; "
        f"steps {run.iter_num} -> {cfg.max_iters}")
    if windows:
        say(f"tracking same-targets perplexity at {', '.join(map(short, cfg.tracked_lengths()))} on {len(windows)} "
            f"validation windows x {min(cfg.tracked_lengths() + [512])} targets")
    if cfg.passkey_mix > 0:
        say(f"passkey: {cfg.passkey_mix:.0%} of training rows are passkey texts; {cfg.passkey_trials} trials at "
            f"{cfg.block_size} at each evaluation")
    record(run, event="start", iter=run.iter_num, config=dataclasses.asdict(cfg), params=raw_model.num_params(),
           world=procs.world, init_from=run.source, data_fingerprint=fingerprint)
    return run


def tokens_per_step(cfg):
    return cfg.batch_size * cfg.block_size * cfg.grad_accum


def next_batch(run):
    """The next micro-batch: random windows of the training split, some rows replaced by passkey texts, and
    their positions (None: contiguous)."""
    cfg = run.cfg
    x, y = run.splits["train"].batch(cfg.batch_size, cfg.block_size, run.batch_gen, run.procs.device)
    x, y = passkey.mix_into(x, y, run.tok, cfg.passkey_mix, run.batch_gen)
    positions = training_positions(cfg.training_positions(), cfg.batch_size, cfg.block_size, run.batch_gen,
                                   run.procs.device)
    return x, y, positions


def lr_at(it, cfg):
    """Linear warm-up to learning_rate, then cosine down to min_lr at lr_decay_iters (default max_iters)."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def gather(run, obj):
    """obj from every process (a list of one without DDP)."""
    if not run.procs.ddp:
        return [obj]
    objs = [None] * run.procs.world
    dist.all_gather_object(objs, obj)
    return objs


def record(run, **kw):
    """One JSON line in log.jsonl (master only)."""
    if run.jsonl:
        run.jsonl.write(json.dumps(kw) + "\n")
        run.jsonl.flush()


@torch.no_grad()
def estimate_losses(run):
    """Mean loss over eval_iters batches of each split (corpus text only), the same windows at every evaluation."""
    cfg, procs = run.cfg, run.procs
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    out = {}
    for name, split in run.splits.items():
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            x, y = split.batch(cfg.batch_size, cfg.block_size, gen, procs.device)
            with procs.autocast():
                losses[k] = run.model(x, y)[1].item()
        out[name] = losses.mean().item()
    return out


@torch.no_grad()
def long_context_checks(run):
    """({length: same-targets perplexity} for --eval_lengths, passkey scores at block_size or None), master only."""
    cfg, procs = run.cfg, run.procs
    if not procs.master:
        return {}, None
    with procs.autocast():
        lengths = cfg.tracked_lengths()
        ppl = {n: same_targets_perplexity(run.raw_model, run.splits["val"], run.windows, n, min(lengths + [512]),
                                          device=procs.device)[0] for n in lengths}
        pk = passkey.score(run.raw_model, run.tok, cfg.block_size, cfg.passkey_trials, seed=cfg.seed,
                           device=procs.device) if cfg.passkey_mix > 0 else None
    return ppl, pk


def kept(run):
    """What a stopped run leaves behind, in words."""
    if os.path.exists(run.ckpt_path):
        return f"{run.ckpt_path} keeps the last good checkpoint"
    return "no checkpoint was written"


def save_checkpoint(run, val_loss):
    """Write out_dir/ckpt.pt (master); the weights are checked first, so a non-finite model never replaces
    the last good checkpoint."""
    rng = {"batch": gather(run, run.batch_gen.get_state()), "torch": gather(run, torch.get_rng_state())}
    if not checkpoint.weights_finite(run.raw_model):
        raise UserError(f"step {run.iter_num}: the weights are not finite; {kept(run)} (try a lower --learning_rate)")
    if run.procs.master:
        checkpoint.save({"model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
                         "model_args": run.cfg.model_args(), "train_config": dataclasses.asdict(run.cfg),
                         "tokenizer": run.tok.name, "iter": run.iter_num, "val_loss": val_loss, "rng": rng,
                         "init_from": run.source, "data_fingerprint": run.fingerprint,
                         "passkey_reached": run.passkey_reached}, run.ckpt_path)


def evaluate_and_save(run):
    """Losses, the long-context checks, a checkpoint, a line and a log record; returns the validation loss."""
    t_eval = time.time()
    run.model.eval()
    losses = estimate_losses(run)
    ppl, pk = long_context_checks(run)
    run.model.train()
    pk_acc = pk and sum(pk["hits"]) / len(pk["hits"])
    if pk and run.cfg.passkey_stop and pk_acc >= run.cfg.passkey_stop and run.passkey_reached is None:
        run.passkey_reached = run.iter_num
    save_checkpoint(run, losses["val"])
    pk_nll = pk and [sum(t) / len(t) for t in zip(*pk["nll"])]  # mean NLL of each answer token
    run.say(f"eval  {run.iter_num:>6} | train {losses['train']:.4f} | val {losses['val']:.4f}"
            + "".join(f" | ppl@{short(n)} {p:.2f}" for n, p in ppl.items())
            + (f" | passkey@{short(run.cfg.block_size)} {pk_acc:.2f} (answer nll {' '.join(f'{v:.2f}' for v in pk_nll)})"
               if pk else "")
            + f" | {time.time() - t_eval:.1f} s | saved {run.ckpt_path}")
    record(run, event="eval", iter=run.iter_num, train_loss=losses["train"], val_loss=losses["val"],
           ppl_at_length={str(n): p for n, p in ppl.items()}, eval_s=time.time() - t_eval,
           **({"passkey": pk_acc, "passkey_answer_nll": pk_nll} if pk else {}))
    return losses["val"]


def check_finite_loss(run, bad_step, bad_loss):
    """Stop at the first step whose loss was not finite (bad_step -1: none yet). Read at log and evaluation
    time only, so the loop never waits for the device just to look."""
    if bad_step.item() >= 0:
        raise UserError(f"step {bad_step.item()}: the loss is {bad_loss.item()} (not finite); {kept(run)} "
                        "(try a lower --learning_rate or --grad_clip=1)")


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
        run = start_run(cfg, procs, say)
        try:
            return train_loop(run)
        finally:
            if run.jsonl:
                run.jsonl.close()


def log_progress(run, loss, lr, dt, peak):
    """The progress line and its log record: loss, learning rate, speed, MFU (on a GPU we know), time left."""
    cfg = run.cfg
    mfu = run.raw_model.estimate_mfu(tokens_per_step(cfg), dt, peak) if peak else None
    run.say(f"iter {run.iter_num:>6}/{cfg.max_iters} | loss {loss:.4f} | lr {lr:.2e} | {dt * 1000:.0f} ms/step | "
            f"{tokens_per_step(cfg) / dt / 1000:.1f}k tok/s" + (f" | mfu {100 * mfu:.1f}%" if mfu else "")
            + f" | eta {fmt_time((cfg.max_iters - run.iter_num) * dt)}")
    record(run, event="train", iter=run.iter_num, loss=loss, lr=lr, ms_per_step=dt * 1000,
           tokens_per_s=tokens_per_step(cfg) / dt, mfu=mfu)


def train_loop(run):
    """The loop, step by step in nanoGPT's order; returns the run's summary."""
    cfg, procs = run.cfg, run.procs
    accum = cfg.grad_accum // procs.world
    peak = peak_flops(procs.device)
    bad_step = torch.tensor(-1, device=procs.device)  # the first step whose loss is not finite, and that loss
    bad_loss = torch.tensor(0.0, device=procs.device)
    t_start = t_last = time.time()
    first_iter, last_val = run.iter_num, None
    run.model.train()
    while run.iter_num < cfg.max_iters and not passkey_done(run):
        # this step's learning rate: linear warm-up, then cosine decay
        lr = lr_at(run.iter_num, cfg)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        # forward and backward over the micro-batches; gradients add up (DDP syncs on the last one only)
        loss = torch.zeros((), device=procs.device)
        for micro in range(accum):
            x, y, positions = next_batch(run)
            sync = run.model.no_sync() if procs.ddp and micro < accum - 1 else nullcontext()
            with sync:
                with procs.autocast():
                    _, micro_loss = run.model(x, y, positions=positions)
                run.scaler.scale(micro_loss / accum).backward()
            loss += micro_loss.detach() / accum
        # note the first non-finite loss, on the device (it is read when a line is printed)
        bad = (bad_step < 0) & ~torch.isfinite(loss)
        bad_step, bad_loss = torch.where(bad, run.iter_num + 1, bad_step), torch.where(bad, loss, bad_loss)
        # clip the gradient norm (unscaled first when float16 scales the loss)
        if cfg.grad_clip > 0:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
        # step the optimizer, then drop the gradients
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.iter_num += 1

        # progress line: loss, learning rate, speed, MFU (on a GPU we know), time left
        if run.iter_num % cfg.log_interval == 0 or run.iter_num == cfg.max_iters:
            check_finite_loss(run, bad_step, bad_loss)  # waits for the device, once per line
            now = time.time()
            dt, t_last = (now - t_last) / ((run.iter_num - 1) % cfg.log_interval + 1), now
            log_progress(run, loss.item(), lr, dt, peak)
        # evaluate, track longer contexts, checkpoint
        if run.iter_num % cfg.eval_interval == 0 or run.iter_num == cfg.max_iters:
            check_finite_loss(run, bad_step, bad_loss)
            last_val = evaluate_and_save(run)
            t_last = time.time()  # evaluation time is not training time
    if run.iter_num == 0:  # --max_iters=0: the fresh (or converted) model is evaluated and saved as it is
        last_val = evaluate_and_save(run)
    return finish(run, last_val, time.time() - t_start, first_iter)


def passkey_done(run):
    """--passkey_stop: two evaluations have passed since passkey accuracy first reached it."""
    reached = run.passkey_reached
    return reached is not None and run.iter_num >= reached + 2 * run.cfg.eval_interval


def finish(run, last_val, seconds, first_iter=0):
    """The end: DDP ranks agree (or it is an error), the last record and line; returns the summary."""
    summary = dict(iters=run.iter_num, val_loss=last_val, seconds=seconds, out_dir=run.cfg.out_dir)
    if run.procs.ddp:
        prints = gather(run, weights_fingerprint(run.raw_model))
        summary["rank_fingerprints"] = prints
        if len(set(prints)) != 1:
            raise RuntimeError(f"DDP ranks ended with different weights: {prints}")
        run.say(f"ddp: weights identical on all {run.procs.world} processes (fingerprint {prints[0]})")
        dist.barrier()  # no rank tears its connections down while another still reads from them
        dist.destroy_process_group()
    if run.passkey_reached is not None:
        summary["passkey_reached"] = run.passkey_reached
    record(run, event="end", **summary)
    steps = f"steps {first_iter}-{run.iter_num}" if first_iter else f"{run.iter_num} steps"
    run.say(f"done: {steps} in {fmt_time(seconds)}"
            + (f", val loss {last_val:.4f}" if last_val is not None else "")
            + (f"; passkey reached {run.cfg.passkey_stop} at step {run.passkey_reached}" if run.passkey_reached
               is not None else "") + f"; checkpoint {run.ckpt_path}")
    return summary


def weights_fingerprint(model):
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def short(n):
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)
