"""Training configuration: one dataclass, named presets, `--key=value` overrides with type checks.

    python train.py --preset=pycode-gpu --attention=rope --max_iters=100

A preset sets the defaults; each override then replaces one field. `--flag` alone sets a boolean
flag to true. An unknown key or a value of the wrong type is one clear error listing what is allowed.
"""
import dataclasses
from dataclasses import dataclass

from .errors import UserError
from .model import ATTENTIONS


@dataclass
class TrainConfig:
    preset: str = "shakespeare-cpu"
    # data
    corpus: str = "shakespeare"
    tokenizer: str = "bytes"
    data_dir: str = "data_cache"
    # model
    attention: str = "coca"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 512
    dropout: float = 0.0
    bias: bool = False
    # optimisation
    batch_size: int = 8  # sequences per micro-batch (per process under DDP)
    grad_accum: int = 1  # micro-batches per step, summed over all processes
    max_iters: int = 600
    learning_rate: float = 2e-3
    min_lr: float = 2e-4
    warmup_iters: int = 40
    lr_decay_iters: int = 0  # 0: decay until max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    # logging, checkpoints
    eval_interval: int = 150
    eval_iters: int = 20
    log_interval: int = 10
    out_dir: str = "out"
    resume: bool = False
    # system
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, float32 elsewhere), float32, bfloat16, float16
    compile: bool = False
    seed: int = 1337

    def __post_init__(self):
        choices = {"attention": ATTENTIONS, "tokenizer": ("gpt2", "bytes"),
                   "dtype": ("auto", "float32", "bfloat16", "float16")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"--{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise UserError(f"--device={self.device!r}: use auto, cpu, cuda, cuda:N or mps")
        for key in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "eval_iters",
                    "log_interval", "eval_interval"):
            if getattr(self, key) < 1:
                raise UserError(f"--{key}={getattr(self, key)} must be at least 1")
        if self.max_iters < 0 or self.warmup_iters < 0 or self.lr_decay_iters < 0:
            raise UserError("--max_iters, --warmup_iters and --lr_decay_iters must not be negative")


PRESETS = {
    # about 6 minutes of training on 2 CPU cores; the samples already look like a play
    "shakespeare-cpu": {},
    # the CoCA-versus-RoPE extrapolation experiment: about 2 minutes on one H100
    "pycode-gpu": dict(corpus="pycode", tokenizer="gpt2", n_layer=6, n_head=6, n_embd=384, block_size=512,
                       batch_size=48, max_iters=1800, learning_rate=1.5e-3, min_lr=1.5e-4, warmup_iters=100,
                       beta2=0.95, eval_interval=300, eval_iters=40, log_interval=50, compile=True,
                       out_dir="out-pycode"),
    # GPT-2 small at 512 context for real single-GPU runs on your own data (--corpus=text:PATH)
    "gpt2-small": dict(corpus="pycode", tokenizer="gpt2", n_layer=12, n_head=12, n_embd=768, block_size=512,
                       batch_size=32, grad_accum=4, max_iters=20000, learning_rate=6e-4, min_lr=6e-5,
                       warmup_iters=1000, beta2=0.95, eval_interval=1000, eval_iters=100, log_interval=50,
                       compile=True, out_dir="out-gpt2-small"),
}
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def convert(key, raw):
    kind = FIELDS[key].type
    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(kind, kind)
    if kind is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{key}={raw!r} is not a boolean (true/false)")
    try:
        return kind(raw)
    except ValueError:
        raise UserError(f"--{key}={raw!r} is not a valid {kind.__name__}") from None


def parse_overrides(argv):
    """['--preset=x', '--max_iters=5', '--resume'] -> {'preset': 'x', 'max_iters': 5, 'resume': True}."""
    out = {}
    for arg in argv:
        key, eq, raw = arg[2:].partition("=") if arg.startswith("--") else (arg, "", "")
        key = key.replace("-", "_")
        if not arg.startswith("--") or key not in FIELDS:
            raise UserError(f"unknown option {arg!r}; the options are: " + ", ".join(f"--{k}" for k in FIELDS))
        if not eq and FIELDS[key].type not in ("bool", bool):
            raise UserError(f"--{key} needs a value: --{key}=VALUE")
        out[key] = convert(key, raw) if eq else True
    return out


def make_config(argv=(), **overrides):
    """TrainConfig from a preset (--preset=..., default shakespeare-cpu) and overrides (argv, then keywords)."""
    given = {**parse_overrides(list(argv)), **overrides}
    preset = given.get("preset", TrainConfig.preset)
    if preset not in PRESETS:
        raise UserError(f"--preset={preset!r} is not one of {', '.join(PRESETS)}")
    return TrainConfig(**{**PRESETS[preset], **given, "preset": preset})
