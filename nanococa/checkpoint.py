"""One checkpoint format: save atomically, load with weights_only=True, rebuild model and tokenizer.

A checkpoint is a dict of tensors and plain values: model and optimizer state, the model's GPTConfig
fields ("model_args"), the training config, the tokenizer's name, the iteration, the RNG states and,
for a run started with --init_from, where its weights came from.
"""
import contextlib
import glob
import os
import signal
import threading

import torch

from .errors import UserError
from .model import GPT, GPTConfig
from .tokenizer import get_tokenizer

TMP_SUFFIX = ".tmp."


@contextlib.contextmanager
def sigint_deferred():
    """Ctrl-C inside the block is held back and raised as KeyboardInterrupt when the block ends, so a
    checkpoint write is never cut in half (which can abort inside torch's writer instead of exiting)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def save(obj, path):
    """Write to a temporary file beside path, then rename over it: an interrupted or failed write never
    leaves a half-written file where the last good checkpoint was. A full disk is a UserError."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}{TMP_SUFFIX}{os.getpid()}"
    try:
        with sigint_deferred():
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"could not write the checkpoint {path} ({e.strerror or e}); "
                        "the previous checkpoint there, if any, is unchanged") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(folder):
    """Delete half-written checkpoints left by a killed process (call it while holding the folder's lock)."""
    stale = glob.glob(os.path.join(glob.escape(folder), f"*.pt{TMP_SUFFIX}*"))
    for path in stale:
        os.remove(path)
    return stale


def load(path, map_location="cpu"):
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train one first (python train.py) or pass --ckpt=PATH")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    missing = {"model", "model_args", "tokenizer"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise UserError(f"{path} is not a nanococa checkpoint: it lacks {', '.join(sorted(missing))}")
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


def load_weights(model, state, path):
    """model.load_state_dict(state), with missing, unexpected or misshapen tensors as one UserError."""
    if not isinstance(state, dict):
        raise UserError(f"{path}: its model state is not a dict of tensors")
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in state] + [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)}" for k, v in state.items()
                 if k in own and (not torch.is_tensor(v) or v.shape != own[k].shape)]
    if problems:
        raise UserError(f"{path}: the weights do not fit its model_args: " + "; ".join(problems[:4])
                        + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""))
    model.load_state_dict(state)


def load_model(path, device="cpu", dtype=None):
    """(model in eval mode, tokenizer, checkpoint dict) from a checkpoint file or its folder."""
    ckpt = load(path)
    model = GPT(model_config(ckpt, path))
    load_weights(model, ckpt["model"], path)
    model.to(device=device, dtype=dtype).eval()
    return model, get_tokenizer(ckpt["tokenizer"]), ckpt


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
