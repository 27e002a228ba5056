"""One checkpoint format: save atomically, load with weights_only=True, rebuild model and tokenizer.

A checkpoint is a dict of tensors and plain values: model and optimizer state, the model's GPTConfig
fields ("model_args"), the training config, the tokenizer's name, the iteration and the RNG states.
"""
import os

import torch

from .errors import UserError
from .model import GPT, GPTConfig
from .tokenizer import get_tokenizer


def save(obj, path):
    """Write to a temporary file beside path, then rename over it: an interrupted write never
    leaves a half-written file where the last good checkpoint was."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


def load_model(path, device="cpu", dtype=None):
    """(model in eval mode, tokenizer, checkpoint dict) from a checkpoint file or its folder."""
    ckpt = load(path)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model.to(device=device, dtype=dtype).eval()
    return model, get_tokenizer(ckpt["tokenizer"]), ckpt
