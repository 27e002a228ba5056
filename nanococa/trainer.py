"""The training loop behind train.py, nanoGPT-style. Read top to bottom: train(), the loop, then its helpers
in the order the loop calls them.

AdamW (fused on CUDA), linear warm-up then cosine decay, gradient accumulation and clipping, bf16
autocast on CUDA, optional torch.compile, several processes through torchrun + DDP (NCCL on GPU,
gloo on CPU). Every eval_interval steps and at the end: train/val loss, optionally same-targets
perplexity at longer contexts (--eval_lengths) and passkey accuracy at block_size (--passkey_mix), and
an atomic checkpoint (model, optimizer, configs, tokenizer, step, RNG states); --resume continues
exactly there, --init_from starts a new run from another model's weights (a nanococa checkpoint, or a
pretrained Hugging Face model converted to CoCA: the same loop trains both). Console: a progress line
every log_interval steps. <out_dir>/log.jsonl: one JSON record per line.

Nothing saved is lost (nanococa/checkpoint.py holds the checks): a fresh run refuses an out_dir holding a
checkpoint or a run's log (unless --overwrite), two runs cannot share an out_dir, and a step whose loss or
weights are not finite stops the run before it can replace the last good checkpoint.
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
from .common import (fmt_length, fmt_time, method_name, open_new_or_own, peak_flops, resolve_device,
                     resolve_dtype)
from .data import Split, prepare, training_positions
from .errors import UserError
from .evaluate import pick_windows, same_targets_perplexity


def train(cfg, log=print):
    """Run one training job described by a TrainConfig; returns a summary dict."""
    place = setup_processes(cfg)
    log = log if place.main else (lambda *a, **k: None)
    with checkpoint.run_folder(cfg, place.main, log):
        run = start_run(cfg, place, log)
        try:
            return train_loop(run)
        finally:
            if run.log_file:
                run.log_file.close()


def train_loop(run):
    """The loop, step by step in nanoGPT's order; returns the run's summary."""
    cfg, place = run.cfg, run.place
    micro_steps = cfg.grad_accum // place.world
    peak = peak_flops(place.device)
    non_finite = FirstNonFiniteLoss(place.device)
    t_start = t_last = time.time()
    first_iter, val_loss = run.iter_num, None
    run.model.train()
    while run.iter_num < cfg.max_iters and not passkey_learned(run):
        # this step's learning rate: linear warm-up, then cosine decay
        lr = lr_at(run.iter_num, cfg)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        # forward and backward over the micro-batches; gradients add up (DDP syncs on the last one only)
        loss = torch.zeros((), device=place.device)
        for micro in range(micro_steps):
            x, y, positions = next_batch(run)
            with run.model.no_sync() if place.ddp and micro < micro_steps - 1 else nullcontext():
                with place.autocast():
                    _, micro_loss = run.model(x, y, positions=positions)
                run.scaler.scale(micro_loss / micro_steps).backward()
            loss += micro_loss.detach() / micro_steps
        # note a loss that is not finite, on the device (read when a line is printed)
        non_finite.note(loss, run.iter_num + 1)
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
            non_finite.stop_if_seen(run)  # waits for the device, once per line
            now = time.time()
            dt, t_last = (now - t_last) / ((run.iter_num - 1) % cfg.log_interval + 1), now
            log_progress(run, loss.item(), lr, dt, peak)
        # evaluate, track longer contexts and passkey, save a checkpoint
        if run.iter_num % cfg.eval_interval == 0 or run.iter_num == cfg.max_iters:
            non_finite.stop_if_seen(run)
            val_loss = evaluate_and_save(run)
            t_last = time.time()  # evaluation time is not training time
    if run.iter_num == 0:  # --max_iters=0: the fresh (or converted) model is evaluated and saved as it is
        val_loss = evaluate_and_save(run)
    return finish(run, val_loss, time.time() - t_start, first_iter)

# -----------------------------------------------------------------------------------------------
# What the loop holds and calls, in the order it calls it.


@dataclasses.dataclass
class Placement:
    """Where this process runs: DDP rank and world size, device, dtype and the autocast to use."""
    ddp: bool
    rank: int
    local_rank: int
    world: int
    device: str
    dtype: str

    @property
    def main(self):
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
    place: Placement
    tok: object
    raw_model: torch.nn.Module  # the model itself (a GPT, or a drop-in): checkpoints, evaluation
    model: torch.nn.Module  # what the loop calls: raw_model, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    splits: dict  # "train", "val": data.Split
    windows: list  # fixed validation windows for --eval_lengths
    batch_gen: torch.Generator  # draws every batch, passkey row and position: saved, so resume is exact
    iter_num: int
    source: Optional[dict]  # where --init_from's weights came from
    fingerprint: str  # of the corpus the run trains on
    passkey_reached: Optional[int]  # the first evaluation at which passkey accuracy reached --passkey_stop
    log: Callable  # prints a line (on the main process only)
    log_file: object  # log.jsonl, open for appending (main process only)
    clock: float = 0.0  # time.time() less the seconds trained before a --resume: the run's own clock

    @property
    def ckpt_path(self):
        return os.path.join(self.cfg.out_dir, "ckpt.pt")


def setup_processes(cfg):
    """Resolve device and dtype; under torchrun, join the process group."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, local_rank, world = 0, 0, 1
    if ddp:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if cfg.grad_accum % world:
        raise UserError(f"--grad_accum={cfg.grad_accum} must be a multiple of the {world} processes")
    device = resolve_device(cfg.device, local_rank)
    place = Placement(ddp, rank, local_rank, world, device, resolve_dtype(cfg.dtype, device))
    if ddp:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if place.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if place.device_type == "cpu" and cfg.flush_denormal:
        torch.set_flush_denormal(True)  # see TrainConfig.flush_denormal
    return place


def start_run(cfg, place, log):
    """Everything before the first step: model, optimizer and tokenizer (fresh, resumed or converted), the
    passkey check, data, RNG states, compile and DDP, the log file and the opening lines."""
    start = checkpoint.restore(cfg, place.device, log)
    tok = start.tokenizer
    if cfg.passkey_mix > 0 and passkey.min_length(tok) > cfg.block_size:
        raise UserError(f"--passkey_mix: a passkey text needs {passkey.min_length(tok)} tokens with "
                        f"{tok.name}, more than --block_size={cfg.block_size}")
    splits, windows, fingerprint = load_data(cfg, place, tok, log)
    if start.fingerprint and start.fingerprint != fingerprint:
        log(f"resume: the corpus {cfg.corpus} changed since this run started (fingerprint "
            f"{start.fingerprint} -> {fingerprint}); the run goes on with the new data, so it is no longer "
            "an exact continuation")
    batch_gen = torch.Generator().manual_seed(cfg.seed + 1000 * place.rank)
    torch.manual_seed(cfg.seed + place.rank)  # dropout differs across processes
    if start.rng:
        batch_gen.set_state(start.rng["batch"][place.rank % len(start.rng["batch"])])
        torch.set_rng_state(start.rng["torch"][place.rank % len(start.rng["torch"])])
    model = torch.compile(start.model) if cfg.compile else start.model
    if place.ddp:
        model = DDP(model, device_ids=[place.local_rank] if place.device_type == "cuda" else None)
    log_file = None
    if place.main:  # a fresh run (or --overwrite) starts a new log; --resume appends to its own
        log_file = open_new_or_own(os.path.join(cfg.out_dir, "log.jsonl"), "a" if cfg.resume else "w")
    run = Run(cfg, place, tok, start.model, model, start.optimizer,
              torch.amp.GradScaler(place.device_type, enabled=place.dtype == "float16"), splits, windows,
              batch_gen, start.iter, start.source, fingerprint, start.passkey_reached, log, log_file,
              time.time() - start.seconds)
    described = getattr(start.model, "description", None) or (
        f"{method_name(cfg.attention, cfg.attn_scale)}, {cfg.n_layer} layers x {cfg.n_embd}")
    log(f"model: {described}, {start.model.num_params() / 1e6:.2f}M parameters, context {cfg.block_size}; "
        f"device {place.device} ({place.dtype}){f', {place.world} processes' if place.ddp else ''}; "
        f"{tokens_per_step(cfg):,} tokens per step; steps {run.iter_num} -> {cfg.max_iters}")
    if windows:
        log(f"tracking same-targets perplexity at {', '.join(map(fmt_length, cfg.tracked_lengths()))} on "
            f"{len(windows)} validation windows x {min(cfg.tracked_lengths() + [512])} targets")
    if cfg.passkey_mix > 0:
        log(f"passkey: {cfg.passkey_mix:.0%} of training rows are passkey texts; {cfg.passkey_trials} trials "
            f"at {cfg.block_size} at each evaluation")
    if cfg.training_positions():
        log(f"positions: {cfg.positions} in training (evaluation: contiguous)")
    record(run, event="start", iter=run.iter_num, config=dataclasses.asdict(cfg),
           params=start.model.num_params(), world=place.world, init_from=run.source,
           data_fingerprint=fingerprint)
    return run


def load_data(cfg, place, tok, log):
    """Tokenize the corpus once (the main process first; the others then reuse its cache) and check that both
    splits are long enough for the context and the tracked lengths before training starts.
    Returns (splits, windows for --eval_lengths, the corpus fingerprint)."""
    if place.main:
        folder = prepare(cfg.corpus, tok, cfg.data_dir, log=log)
    if place.ddp:
        dist.barrier()
    if not place.main:
        folder = prepare(cfg.corpus, tok, cfg.data_dir, log=lambda *a: None)
    splits = {s: Split(folder, s) for s in ("train", "val")}
    for name, split in splits.items():
        if len(split) <= cfg.block_size + 1:
            raise UserError(f"corpus {cfg.corpus}: the {name} split has {len(split):,} tokens, too few for "
                            f"--block_size={cfg.block_size}")
    lengths = cfg.tracked_lengths()
    windows = []
    if lengths:
        windows = pick_windows(splits["val"], max(lengths), min(lengths + [512]), cfg.eval_windows,
                               "--eval_lengths")
    return splits, windows, splits["train"].fingerprint


def tokens_per_step(cfg):
    return cfg.batch_size * cfg.block_size * cfg.grad_accum


def passkey_learned(run):
    """--passkey_stop: two evaluations have passed since passkey accuracy first reached it (a run resumed
    without --passkey_stop goes on to max_iters)."""
    reached = run.passkey_reached
    if not run.cfg.passkey_stop or reached is None:
        return False
    return run.iter_num >= reached + 2 * run.cfg.eval_interval


def lr_at(it, cfg):
    """Linear warm-up to learning_rate, then cosine down to min_lr at lr_decay_iters (default max_iters)."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def next_batch(run):
    """The next micro-batch: random windows of the training split, some rows replaced by passkey texts, and
    their positions (None: contiguous)."""
    cfg = run.cfg
    x, y = run.splits["train"].batch(cfg.batch_size, cfg.block_size, run.batch_gen, run.place.device)
    x, y = passkey.mix_into(x, y, run.tok, cfg.passkey_mix, run.batch_gen)
    positions = training_positions(cfg.training_positions(), cfg.batch_size, cfg.block_size, run.batch_gen,
                                   run.place.device)
    return x, y, positions


class FirstNonFiniteLoss:
    """The first step whose loss was not finite, noted on the device so the loop never waits to look; read
    (stop_if_seen) only where a line is printed or a checkpoint saved."""

    def __init__(self, device):
        self.step = torch.tensor(-1, device=device)  # -1: none yet
        self.loss = torch.tensor(0.0, device=device)

    def note(self, loss, step):
        first = (self.step < 0) & ~torch.isfinite(loss)
        self.step, self.loss = torch.where(first, step, self.step), torch.where(first, loss, self.loss)

    def stop_if_seen(self, run):
        if self.step.item() >= 0:
            raise UserError(f"step {self.step.item()}: the loss is {self.loss.item()} (not finite); "
                            f"{checkpoint.what_remains(run.ckpt_path)} (try a lower --learning_rate or "
                            "--grad_clip=1)")


def log_progress(run, loss, lr, dt, peak):
    """The progress line and its log record: loss, learning rate, speed, MFU (on a GPU we know), time left."""
    cfg = run.cfg
    tokens = tokens_per_step(cfg)
    mfu = run.raw_model.estimate_mfu(tokens, dt, peak) if peak else None
    tps = tokens / dt
    run.log(f"iter {run.iter_num:>6}/{cfg.max_iters} | loss {loss:.4f} | lr {lr:.2e} | {dt * 1000:.0f} "
            f"ms/step | " + (f"{tps / 1000:.1f}k tok/s" if tps >= 1000 else f"{tps:.0f} tok/s")
            + (f" | mfu {100 * mfu:.1f}%" if mfu else "")
            + f" | eta {fmt_time((cfg.max_iters - run.iter_num) * dt)}")
    record(run, event="train", iter=run.iter_num, loss=loss, lr=lr, ms_per_step=dt * 1000, tokens_per_s=tps,
           mfu=mfu)


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
    run.log(f"eval  {run.iter_num:>6} | train {losses['train']:.4f} | val {losses['val']:.4f}"
            + "".join(f" | ppl@{fmt_length(n)} {p:.2f}" for n, p in ppl.items())
            + (f" | passkey@{fmt_length(run.cfg.block_size)} {pk_acc:.2f} (answer nll "
               f"{' '.join(f'{v:.2f}' for v in pk_nll)})" if pk else "")
            + f" | {time.time() - t_eval:.1f} s | saved {run.ckpt_path}")
    record(run, event="eval", iter=run.iter_num, train_loss=losses["train"], val_loss=losses["val"],
           ppl_at_length={str(n): p for n, p in ppl.items()}, eval_s=time.time() - t_eval,
           **({"passkey": pk_acc, "passkey_answer_nll": pk_nll} if pk else {}))
    return losses["val"]


@torch.no_grad()
def estimate_losses(run):
    """Mean loss over eval_iters batches of each split (corpus text only, contiguous positions), the same
    windows at every evaluation."""
    cfg, place = run.cfg, run.place
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    out = {}
    for name, split in run.splits.items():
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            x, y = split.batch(cfg.batch_size, cfg.block_size, gen, place.device)
            with place.autocast():
                losses[k] = run.model(x, y)[1].item()
        out[name] = losses.mean().item()
    return out


@torch.no_grad()
def long_context_checks(run):
    """({length: same-targets perplexity} for --eval_lengths, passkey scores at block_size or None), main
    process only."""
    cfg, place = run.cfg, run.place
    if not place.main:
        return {}, None
    with place.autocast():
        lengths = cfg.tracked_lengths()
        target = min(lengths + [512])
        ppl = {n: same_targets_perplexity(run.raw_model, run.splits["val"], run.windows, n, target,
                                          device=place.device)[0] for n in lengths}
        pk = passkey.score(run.raw_model, run.tok, cfg.block_size, cfg.passkey_trials, seed=cfg.seed,
                           device=place.device) if cfg.passkey_mix > 0 else None
    return ppl, pk


def save_checkpoint(run, val_loss):
    """out_dir/ckpt.pt, through checkpoint.save_training (which refuses weights that are not finite)."""
    rng = {"batch": gather(run, run.batch_gen.get_state()), "torch": gather(run, torch.get_rng_state())}
    checkpoint.save_training(run.ckpt_path, run.raw_model, run.optimizer, run.place.main,
                             train_config=dataclasses.asdict(run.cfg), tokenizer=run.tok.name,
                             iter=run.iter_num, val_loss=val_loss, rng=rng, init_from=run.source,
                             data_fingerprint=run.fingerprint, passkey_reached=run.passkey_reached,
                             seconds=time.time() - run.clock)


def gather(run, obj):
    """obj from every process (a list of one without DDP)."""
    if not run.place.ddp:
        return [obj]
    objs = [None] * run.place.world
    dist.all_gather_object(objs, obj)
    return objs


def record(run, **kw):
    """One JSON line in log.jsonl (main process only); a full disk is one line, the checkpoint kept."""
    if run.log_file:
        try:
            run.log_file.write(json.dumps(kw) + "\n")
            run.log_file.flush()
        except OSError as e:
            raise UserError(f"could not write {run.cfg.out_dir}/log.jsonl ({e.strerror or e}); "
                            f"{checkpoint.what_remains(run.ckpt_path)}") from None


def finish(run, val_loss, seconds, first_iter=0):
    """The end: DDP ranks agree (or it is an error), the last record and line; returns the summary."""
    # seconds: this process; run_seconds: every part of the run since step 0 (across --resume)
    summary = dict(iters=run.iter_num, val_loss=val_loss, seconds=seconds,
                   run_seconds=time.time() - run.clock, out_dir=run.cfg.out_dir)
    if run.place.ddp:
        prints = gather(run, weights_fingerprint(run.raw_model))
        summary["rank_fingerprints"] = prints
        if len(set(prints)) != 1:
            raise RuntimeError(f"DDP ranks ended with different weights: {prints}")
        run.log(f"ddp: weights identical on all {run.place.world} processes (fingerprint {prints[0]})")
        dist.barrier()  # no rank tears its connections down while another still reads from them
        dist.destroy_process_group()
    if run.passkey_reached is not None:
        summary["passkey_reached"] = run.passkey_reached
    record(run, event="end", **summary)
    steps = f"steps {first_iter}-{run.iter_num}" if first_iter else f"{run.iter_num} steps"
    run.log(f"done: {steps} in {fmt_time(seconds)}"
            + (f", val loss {val_loss:.4f}" if val_loss is not None else "")
            + (f"; passkey reached {run.cfg.passkey_stop} at step {run.passkey_reached}"
               if run.passkey_reached is not None else "") + f"; checkpoint {run.ckpt_path}")
    return summary


def weights_fingerprint(model):
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
