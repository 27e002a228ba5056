"""One checkpoint format: saved atomically with a digest of its tensors, loaded with weights_only=True and
checked before anything is built from it.

A checkpoint is a dict of tensors and plain values: model and optimizer state, the model's GPTConfig
fields ("model_args"), the training config, the tokenizer's name, the iteration, the RNG states, the
fingerprint of the data it trained on and, for a run started with --init_from, where its weights came
from. A drop-in (a pretrained Hugging Face model converted to CoCA, nanococa/hf.py) also carries "hf":
its source, and its config and tokenizer files as text, so it loads with no other file. "digest" is a
SHA-256 of every tensor in it, written at save time and checked at load, so a damaged file is refused
with one line instead of computing something else without a word.

train.py needs three calls, the checks behind them:
    with run_folder(cfg):               out_dir checked and locked for the whole run, half-written files gone
    start = restore(cfg, device)        the model, optimizer and tokenizer, fresh, resumed or converted
    save_training(path, model, ...)     the weights checked finite, then written atomically
The scripts read checkpoints with load(path) and load_model(path, device, dtype).
"""
import contextlib
import dataclasses
import glob
import hashlib
import os
import pickle
from typing import Optional

import torch

from .common import TMP_SUFFIX, atomic_write, file_lock
from .errors import UserError
from .model import GPT, GPTConfig
from .tokenizer import get_tokenizer

# Model fields that may change on --resume: they do not change what the weights mean.
RESUMABLE_MODEL_FIELDS = ("dropout", "attn_impl")
# Everything else in GPTConfig, and these, must match the checkpoint on --resume.
FIXED_ON_RESUME = tuple(f.name for f in dataclasses.fields(GPTConfig)
                        if f.name not in RESUMABLE_MODEL_FIELDS) + ("corpus", "tokenizer")
FIXED_ON_RESUME_DROP_IN = ("attention", "block_size", "corpus")  # the rest comes from the pretrained model

# -----------------------------------------------------------------------------------------------
# For train.py.


@contextlib.contextmanager
def run_folder(cfg, main=True, log=print):
    """Hold out_dir for one training run: a writable folder that a fresh run may write into (no checkpoint or
    run log there unless --overwrite), locked against a second run, cleared of the half-written checkpoints
    of a killed one. Other DDP processes (main=False) take nothing."""
    if not main:
        yield
        return
    check_out_dir(cfg)
    with file_lock(os.path.join(cfg.out_dir, ".lock"), wait=False, owner="train.py",
                   busy_message=f"--out_dir={cfg.out_dir} is in use"):
        for path in remove_stale_temporaries(cfg.out_dir):
            log(f"removed {path}, a half-written checkpoint left by a killed run")
        yield


def check_out_dir(cfg):
    """Before any long work: out_dir must be a writable folder, and a fresh run must not replace a
    checkpoint, or the log of a run that stopped before its first checkpoint, unless asked to."""
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise UserError(f"--out_dir={cfg.out_dir} is a file, not a folder")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out_dir={cfg.out_dir} cannot be created ({e.strerror})") from None
    if not os.access(cfg.out_dir, os.W_OK | os.X_OK):
        raise UserError(f"--out_dir={cfg.out_dir} is not writable")
    if cfg.resume or cfg.overwrite:
        return
    for name, what in (("ckpt.pt", "a checkpoint"),
                       ("log.jsonl", "the log of a run that saved no checkpoint")):
        path = os.path.join(cfg.out_dir, name)
        if os.path.lexists(path):
            raise UserError(f"{path} holds {what}: continue it with --resume, replace it with --overwrite, "
                            "or choose another --out_dir" if name == "ckpt.pt" else
                            f"{path} holds {what}: replace it with --overwrite, or choose another --out_dir")


def remove_stale_temporaries(folder):
    """Delete half-written checkpoints left by a killed process (call it while holding the folder's lock)."""
    stale = glob.glob(os.path.join(glob.escape(folder), f"*.pt{TMP_SUFFIX}*"))
    for path in stale:
        os.remove(path)
    return stale


@dataclasses.dataclass
class Start:
    """Where a run starts: what restore() returns."""
    model: torch.nn.Module  # on the device
    optimizer: torch.optim.Optimizer
    tokenizer: object
    iter: int = 0
    rng: Optional[dict] = None  # --resume: the random states to continue with
    source: Optional[dict] = None  # --init_from: where the weights came from
    fingerprint: Optional[str] = None  # --resume: the data the checkpoint trained on
    passkey_reached: Optional[int] = None  # --resume: the step at which --passkey_stop was reached
    seconds: float = 0.0  # --resume: the run's wall time up to its checkpoint (0 for checkpoints without it)


def restore(cfg, device, log=print):
    """The model (on device), its optimizer and tokenizer, and the step to start from: resumed from
    out_dir/ckpt.pt, started from --init_from's weights (a nanococa checkpoint, whose attention may change,
    or a pretrained Hugging Face model, converted), or fresh. Every check on a checkpoint comes first."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume:
        ckpt = load(path)
        drop_in = "hf" in ckpt
        if not drop_in:  # the checkpoint's own config must make a model that fits its weights
            check_weights(model_config(ckpt, path), ckpt["model"], path)
        check_training_state(ckpt, path)
        for key, old, new in resume_changes(cfg, ckpt, path):
            log(f"resume: {key} {old!r} -> {new!r}")
        torch.manual_seed(cfg.seed)
        if drop_in:
            model, tok = model_from(ckpt, path)
        else:  # this run's config, which may change dropout and attn_impl
            model = build_model(GPTConfig(**cfg.model_args()), ckpt["model"], path)
            tok = get_tokenizer(cfg.tokenizer)
        start = Start(model, None, tok, ckpt["iter"], ckpt["rng"], ckpt.get("init_from"),
                      ckpt.get("data_fingerprint"), ckpt.get("passkey_reached"), ckpt.get("seconds") or 0.0)
    elif cfg.hf_source:
        from . import hf
        model, tok = hf.from_pretrained(cfg.hf_source, cfg.attention, cfg.block_size, log)
        start = Start(model, None, tok, source=dict(path=cfg.init_from, iter=None, attention="rope",
                                                    attn_scale="none"))
    else:
        torch.manual_seed(cfg.seed)
        tok = get_tokenizer(cfg.tokenizer)
        model = GPT(GPTConfig(**cfg.model_args()))
        start = Start(model, None, tok)
        if cfg.init_from:
            start.model, start.source = init_from(cfg, model, tok, log)
    start.model.to(device)
    start.optimizer = start.model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                                       (cfg.beta1, cfg.beta2), device.split(":")[0])
    if cfg.resume:
        try:
            start.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"--resume: {path}: its optimizer state does not fit the model ({e})") from None
        log(f"resumed from {path} at iter {start.iter}")
    return start


def save_training(path, model, optimizer, main=True, **state):
    """Write a training checkpoint (state: train_config, tokenizer, iter, val_loss, rng, init_from,
    data_fingerprint, passkey_reached, seconds), atomically, on the main process. The weights are checked
    first (on every process), so a model that is not finite never replaces the last good checkpoint."""
    if not weights_finite(model):
        raise UserError(f"step {state['iter']}: the weights are not finite; {what_remains(path)} (try a "
                        "lower --learning_rate)")
    if main:
        if hasattr(model, "checkpoint_fields"):  # a drop-in: its source, config and tokenizer files
            fields = model.checkpoint_fields()
        else:
            fields = {"model_args": dataclasses.asdict(model.config)}
        save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **fields, **state}, path)


def what_remains(path):
    """What a stopped run leaves behind, in words."""
    return f"{path} keeps the last good checkpoint" if os.path.exists(path) else "no checkpoint was written"

# -----------------------------------------------------------------------------------------------
# The format: save and load.


def tensors_digest(obj):
    """SHA-256 over every tensor (dtype, shape, bytes) and plain value in a nested dict/list, in a fixed
    order."""
    h = hashlib.sha256()

    def walk(x):
        if torch.is_tensor(x):
            h.update(f"{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            h.update(repr(x).encode())
    walk({k: v for k, v in obj.items() if k != "digest"})
    return h.hexdigest()


def save(obj, path):
    """Write the checkpoint with its digest, atomically (common.atomic_write): an interrupted or failed
    write leaves the previous checkpoint in place; a full disk is one UserError."""
    obj = {**obj, "digest": tensors_digest(obj)}
    atomic_write(path, lambda f: torch.save(obj, f), what="checkpoint")


def load(path, map_location="cpu"):
    """The checkpoint dict at path (or path/ckpt.pt), checked: readable, holding only tensors and plain
    values, with a model, its config and a tokenizer, its digest matching, its weights finite."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train one first (python train.py) or pass --ckpt=PATH")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # torch's message advises weights_only=False: wrong for a hostile file
        raise UserError(f"{path} is not a readable checkpoint: damaged, not a nanococa checkpoint, or "
                        "holding objects other than tensors and plain values, which are refused unread "
                        "(loading them could run code)") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint: damaged, cut short, or not a checkpoint "
                        f"({type(e).__name__}: {str(e)[:120]})") from None
    missing = {"model", "model_args", "tokenizer"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise UserError(f"{path} is not a nanococa checkpoint: it lacks {', '.join(sorted(missing))}")
    if "digest" in ckpt and ckpt["digest"] != tensors_digest(ckpt):
        raise UserError(f"{path} is damaged: its contents do not match the digest written with them")
    state = ckpt["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path}: its model state is not a dict of tensors")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{path} holds weights that are not finite ({', '.join(bad[:3])}"
                        f"{', ...' if len(bad) > 3 else ''}): it cannot be used")
    return ckpt


def load_model(path, device="cpu", dtype=None):
    """(model in eval mode, tokenizer, checkpoint dict) from a checkpoint file or its folder: a GPT, or a
    drop-in (a converted Hugging Face model with the GPT's interface)."""
    ckpt = load(path)
    model, tok = model_from(ckpt, path)
    model.to(device=device, dtype=dtype).eval()
    return model, tok, ckpt


def model_from(ckpt, path):
    """(model, tokenizer) of a loaded checkpoint, on the CPU."""
    if "hf" in ckpt:
        from . import hf
        return hf.from_checkpoint(ckpt, path)
    return build_model(model_config(ckpt, path), ckpt["model"], path), get_tokenizer(str(ckpt["tokenizer"]))

# -----------------------------------------------------------------------------------------------
# The checks behind them.


def model_config(ckpt, path):
    """GPTConfig of a checkpoint; an unknown key or a bad value is a UserError naming it."""
    args = ckpt["model_args"]
    if not isinstance(args, dict):
        raise UserError(f"{path}: model_args is not a dict")
    unknown = set(args) - set(GPTConfig.__dataclass_fields__)
    if unknown:
        raise UserError(f"{path}: model_args has unknown fields {sorted(unknown)} (a checkpoint of another "
                        "program or a newer nanococa?)")
    try:
        return GPTConfig(**args)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: model_args do not make a model: {e}") from None


def check_fit(own, state, path):
    """The tensors of `state` against a model's state dict `own` (shapes only): one UserError for the
    misfits."""
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
    if problems:
        raise UserError(f"{path}: the weights do not fit its model_args: " + "; ".join(problems[:4])
                        + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""))


def check_weights(config, state, path):
    """The tensors of `state` against a GPT of config, compared on the meta device: a config that does not
    fit its tensors (a vocab_size of 1e9, say) is refused before anything is allocated."""
    with torch.device("meta"):
        check_fit(GPT(config).state_dict(), state, path)


def build_model(config, state, path):
    """A GPT of config with the weights `state`, checked first (check_weights)."""
    check_weights(config, state, path)
    model = GPT(config)
    model.load_state_dict(state)
    return model


def check_training_state(ckpt, path):
    """--resume needs a complete training state of the right types; else one UserError naming what is
    wrong."""
    missing = {"optimizer", "rng", "iter"} - set(ckpt)
    if missing:
        raise UserError(f"--resume: {path} has no {', '.join(sorted(missing))}: it is not a training state "
                        "to continue; start a new run from its weights with --init_from")
    rng = ckpt["rng"]
    problems = []
    if not isinstance(ckpt["iter"], int) or isinstance(ckpt["iter"], bool) or ckpt["iter"] < 0:
        problems.append(f"iter is {ckpt['iter']!r}, not a step number")
    if not isinstance(ckpt.get("train_config"), dict):
        problems.append("train_config is not a dict")
    if not isinstance(ckpt["optimizer"], dict) or "state" not in ckpt["optimizer"]:
        problems.append("optimizer is not an optimizer state")
    if not (isinstance(rng, dict) and all(isinstance(rng.get(k), list) and rng[k] and
                                          all(torch.is_tensor(s) and s.dtype == torch.uint8 for s in rng[k])
                                          for k in ("batch", "torch"))):
        problems.append("rng does not hold the random-number states")
    if problems:
        raise UserError(f"--resume: {path} is not a usable training state: {'; '.join(problems)}")


def resume_changes(cfg, ckpt, path):
    """--resume: fields that define the model or its data must match the checkpoint (a UserError names
    those that do not); the others may change, and come back as [(field, old, new)] to report. A drop-in's
    shape and tokenizer come from its pretrained model, so giving them is a mistake."""
    drop_in = "hf" in ckpt
    if drop_in:
        from .config import check_pretrained_options
        check_pretrained_options(cfg)
    saved = {**ckpt["train_config"], **ckpt["model_args"], "tokenizer": ckpt["tokenizer"]}
    mine = dataclasses.asdict(cfg)
    fixed_fields = FIXED_ON_RESUME_DROP_IN if drop_in else FIXED_ON_RESUME
    fixed = [f"{k}={saved[k]!r} there, {mine[k]!r} here" for k in fixed_fields
             if k in saved and saved[k] != mine[k]]
    if fixed:
        other_preset = saved.get("preset", cfg.preset) != cfg.preset
        hint = f" (it was trained with --preset={saved['preset']})" if other_preset else ""
        raise UserError(f"--resume: {path} differs from this run in {'; '.join(fixed)}{hint}; give the run's "
                        "own options, or start a new run (--init_from to reuse its weights)")
    skip = set(FIXED_ON_RESUME) | {"resume", "overwrite", "init_from"}
    return [(k, saved[k], v) for k, v in mine.items() if k in saved and k not in skip and saved[k] != v]


def init_from(cfg, model, tok, log):
    """--init_from=PATH (a nanococa checkpoint) into a fresh model of this run: (model, source record).
    A drop-in checkpoint is rebuilt and converted to this run's attention; a GPT's weights are copied
    (convert_weights) after the checks that they can mean the same here."""
    path, fresh = cfg.init_from, []
    src = load(path)
    if "hf" in src:
        from . import hf
        model, _ = hf.from_checkpoint(src, path, attention=cfg.attention)
    else:
        if src["tokenizer"] != tok.name:
            raise UserError(f"--init_from={path} was trained with tokenizer {src['tokenizer']}, this run "
                            f"uses {tok.name}")
        theirs = model_config(src, path)
        if theirs.n_head != cfg.n_head:  # the shapes can agree while every head means something else
            raise UserError(f"--init_from={path} has n_head={theirs.n_head}, this run n_head={cfg.n_head}: "
                            "the weights would keep their shapes but each head would mean something else; "
                            f"give --n_head={theirs.n_head}")
        fresh = convert_weights(model, src["model"], path)
    args = src["model_args"]
    source = dict(path=path, iter=src.get("iter"), attention=args.get("attention"),
                  attn_scale=args.get("attn_scale", "none"))
    log(f"init_from: {path} (iter {source['iter']}, {source['attention']}) -> {cfg.attention}"
        + (f"; new: {', '.join(fresh)}" if fresh else ""))
    return model, source


def convert_weights(model, state, path):
    """Copy a checkpoint's weights into a model that may use another attention or attention scale.
    Every tensor is kept where it exists in both with the same shape: RoPE's key projection becomes
    CoCA's T projection (Eq. 5), ALiBi's plain key projection, and so on. Only Scalable-Softmax's s may
    be new (it keeps its initialisation) or left behind; any other difference is a UserError."""
    own = model.state_dict()
    optional = lambda k: k.endswith(".ssmax")  # noqa: E731
    misfits = [f"{k}: {tuple(state[k].shape)} there, {tuple(v.shape)} here" for k, v in own.items()
               if k in state and state[k].shape != v.shape]
    missing = [k for k in own if k not in state and not optional(k)]
    extra = [k for k in state if k not in own and not optional(k)]
    if misfits or missing or extra:
        detail = misfits[:3] + [f"missing {k}" for k in missing[:2]] + [f"unexpected {k}" for k in extra[:2]]
        raise UserError(f"--init_from={path}: its weights do not fit this model (" + "; ".join(detail) + "); "
                        "give the same n_layer, n_head, n_embd, bias and tokenizer as that run")
    model.load_state_dict({k: state[k] if k in state else v for k, v in own.items()})
    return [k for k in own if k not in state]  # the tensors that start fresh


def weights_finite(model):
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
