"""One checkpoint format: saved atomically with a digest of its tensors, loaded with weights_only=True and
checked before anything is built from it.

A checkpoint is a dict of tensors and plain values: model and optimizer state, the model's GPTConfig
fields ("model_args"), the training config, the tokenizer's name, the iteration, the RNG states, the
fingerprint of the data it trained on and, for a run started with --init_from, where its weights came
from. "digest" is a SHA-256 of every tensor in it, written at save time and checked at load, so a
damaged file is refused with one line instead of computing something else without a word.

The checks that read a checkpoint's contents for train.py live here too: what may change on --resume
(FIXED_ON_RESUME), whether a training state is complete, and whether --init_from's weights fit.
"""
import dataclasses
import glob
import hashlib
import os
import pickle

import torch

from .common import TMP_SUFFIX, atomic_write
from .errors import UserError
from .model import GPT, GPTConfig
from .tokenizer import get_tokenizer

# Model fields that may change on --resume: they do not change what the weights mean.
RESUMABLE_MODEL_FIELDS = ("dropout", "attn_impl")
# Everything else in GPTConfig, and these, must match the checkpoint on --resume.
FIXED_ON_RESUME = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name not in RESUMABLE_MODEL_FIELDS) \
    + ("corpus", "tokenizer")


def tensors_digest(obj):
    """SHA-256 over every tensor (dtype, shape, bytes) and plain value in a nested dict/list, in a fixed order."""
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


def remove_stale_temporaries(folder):
    """Delete half-written checkpoints left by a killed process (call it while holding the folder's lock)."""
    stale = glob.glob(os.path.join(glob.escape(folder), f"*.pt{TMP_SUFFIX}*"))
    for path in stale:
        os.remove(path)
    return stale


def load(path, map_location="cpu"):
    """The checkpoint dict at path (or path/ckpt.pt), checked: readable, holding only tensors and plain
    values, with a model, its config and a tokenizer, its digest matching, its weights finite."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train one first (python train.py) or pass --ckpt=PATH")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # torch's message advises weights_only=False: wrong advice for a hostile file
        raise UserError(f"{path} is not a readable checkpoint: damaged, not a nanococa checkpoint, or holding objects "
                        "other than tensors and plain values, which are refused unread (loading them could run "
                        "code)") from None
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


def model_config(ckpt, path):
    """GPTConfig of a checkpoint; an unknown key or a bad value is a UserError naming it."""
    args = ckpt["model_args"]
    if not isinstance(args, dict):
        raise UserError(f"{path}: model_args is not a dict")
    unknown = set(args) - set(GPTConfig.__dataclass_fields__)
    if unknown:
        raise UserError(f"{path}: model_args has unknown fields {sorted(unknown)} (a checkpoint of another program "
                        "or a newer nanococa?)")
    try:
        return GPTConfig(**args)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: model_args do not make a model: {e}") from None


def check_fit(own, state, path):
    """The tensors of `state` against a model's state dict `own` (shapes only): one UserError for the misfits."""
    problems = [f"missing {k}" for k in own if k not in state] + [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)}" for k, v in state.items()
                 if k in own and v.shape != own[k].shape]
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


def load_model(path, device="cpu", dtype=None):
    """(model in eval mode, tokenizer, checkpoint dict) from a checkpoint file or its folder."""
    ckpt = load(path)
    model = build_model(model_config(ckpt, path), ckpt["model"], path)
    model.to(device=device, dtype=dtype).eval()
    return model, get_tokenizer(str(ckpt["tokenizer"])), ckpt

# -----------------------------------------------------------------------------------------------
# What train.py checks in a checkpoint.


def check_training_state(ckpt, path):
    """--resume needs a complete training state of the right types; else one UserError naming what is wrong."""
    missing = {"optimizer", "rng", "iter"} - set(ckpt)
    if missing:
        raise UserError(f"--resume: {path} has no {', '.join(sorted(missing))}: it is not a training state to "
                        "continue; start a new run from its weights with --init_from")
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
    those that do not); the others may change, and come back as [(field, old, new)] to report."""
    saved = {**ckpt["train_config"], **ckpt["model_args"], "tokenizer": ckpt["tokenizer"]}
    mine = dataclasses.asdict(cfg)
    fixed = [f"{k}={saved[k]!r} there, {mine[k]!r} here" for k in FIXED_ON_RESUME if k in saved and saved[k] != mine[k]]
    if fixed:
        hint = f" (it was trained with --preset={saved['preset']})" if saved.get("preset", cfg.preset) != cfg.preset else ""
        raise UserError(f"--resume: {path} differs from this run in {'; '.join(fixed)}{hint}; give the run's own "
                        "options, or start a new run (--init_from to reuse its weights)")
    skip = set(FIXED_ON_RESUME) | {"resume", "overwrite", "init_from"}
    return [(k, saved[k], v) for k, v in mine.items() if k in saved and k not in skip and saved[k] != v]


def init_source(path, cfg, tok):
    """--init_from's checkpoint, after the checks that its weights can mean the same in this run:
    the same tokenizer and the same number of heads (with another n_head the shapes can agree while
    every head means something else)."""
    src = load(path)
    if src["tokenizer"] != tok.name:
        raise UserError(f"--init_from={path} was trained with tokenizer {src['tokenizer']}, this run uses {tok.name}")
    theirs = model_config(src, path)
    if theirs.n_head != cfg.n_head:
        raise UserError(f"--init_from={path} has n_head={theirs.n_head}, this run n_head={cfg.n_head}: the weights "
                        "would keep their shapes but each head would mean something else; give --n_head="
                        f"{theirs.n_head}")
    return src


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
