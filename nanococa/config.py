"""Training configuration: one dataclass, named presets, `--key=value` overrides with type checks.

    python train.py --preset=pycode-cpu --attention=rope --max_iters=100

TrainConfig extends the model's GPTConfig, so every model field (n_layer, attention, attn_scale,
rope_base, attn_impl, ...) is an option with the model's own checks, and nothing is copied by hand;
vocab_size alone is not an option: the tokenizer sets it. A preset sets the defaults; each override
then replaces one field. `--flag` alone sets a boolean flag to true. An unknown key or a value that
cannot be meant (a negative learning rate, a beta outside [0, 1), a number that is not finite) is one
clear error, raised before any data is prepared.
"""
import dataclasses
import math
from dataclasses import dataclass

from .common import DEVICES, DTYPES, parse_lengths
from .errors import UserError
from .model import GPTConfig
from .tokenizer import TOKENIZERS, VOCAB_SIZES


@dataclass
class TrainConfig(GPTConfig):
    preset: str = "shakespeare-cpu"
    # data
    corpus: str = "shakespeare"
    tokenizer: str = "bytes"
    data_dir: str = "data_cache"
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
    grad_clip: float = 1.0  # 0: no clipping
    # evaluation, logging, checkpoints
    eval_interval: int = 150
    eval_iters: int = 20
    eval_lengths: str = ""  # e.g. 512,2K,8K: also track same-targets perplexity at these lengths
    eval_windows: int = 2  # validation windows scored per length for --eval_lengths
    log_interval: int = 10
    out_dir: str = "out"
    resume: bool = False  # continue out_dir/ckpt.pt where it stopped
    overwrite: bool = False  # start afresh in an out_dir that holds a checkpoint
    init_from: str = ""  # start from another checkpoint's weights (its attention may change)
    # system
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, float32 elsewhere), float32, bfloat16, float16
    compile: bool = False
    seed: int = 1337

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{f.name}={value} is not a finite number")
        choices = {"tokenizer": TOKENIZERS, "dtype": DTYPES}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"--{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise UserError(f"--device={self.device!r}: use {DEVICES}")
        self.vocab_size = 64 * math.ceil(VOCAB_SIZES[self.tokenizer] / 64)  # padded: faster matmuls
        try:
            super().__post_init__()
        except ValueError as e:
            raise UserError(f"--{e}") from None
        for key in ("batch_size", "grad_accum", "eval_iters", "eval_windows", "log_interval", "eval_interval"):
            if getattr(self, key) < 1:
                raise UserError(f"--{key}={getattr(self, key)} must be at least 1")
        for key in ("max_iters", "warmup_iters", "lr_decay_iters", "learning_rate", "min_lr", "weight_decay",
                    "grad_clip"):
            if getattr(self, key) < 0:
                raise UserError(f"--{key}={getattr(self, key)} must not be negative")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise UserError(f"--{key}={getattr(self, key)} must be in [0, 1)")
        if self.resume and self.init_from:
            raise UserError("--resume continues this run, --init_from starts a new one from another's weights: "
                            "give one of them")
        if self.resume and self.overwrite:
            raise UserError("--resume keeps the checkpoint in out_dir, --overwrite replaces it: give one of them")
        self.tracked_lengths()  # a bad --eval_lengths is found now, not at the first evaluation

    def tracked_lengths(self):
        """--eval_lengths as a sorted list of ints ([] when off)."""
        try:
            return parse_lengths(self.eval_lengths) if self.eval_lengths else []
        except ValueError as e:
            raise UserError(f"--eval_lengths: {e}") from None

    def model_args(self):
        """The GPTConfig fields of this run."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(GPTConfig)}


# Model fields that may change on --resume: they do not change what the weights mean.
RESUMABLE_MODEL_FIELDS = ("dropout", "attn_impl")
# Everything else in GPTConfig, and these, must match the checkpoint on --resume.
FIXED_ON_RESUME = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name not in RESUMABLE_MODEL_FIELDS) \
    + ("corpus", "tokenizer")

TINY = dict(n_layer=4, n_head=4, n_embd=128, block_size=512)  # 0.83M parameters with bytes
PRESETS = {
    # about 6 minutes of training on 2 CPU cores; the samples already look like a play
    "shakespeare-cpu": dict(TINY),
    # the paper's effect on a laptop: the same model on Python source, 4x the steps (about 15 minutes
    # on 2 cores). Past 512 bytes of context RoPE breaks; CoCA degrades gently (README, results)
    "pycode-cpu": dict(TINY, corpus="pycode", max_iters=2400, eval_interval=240, eval_lengths="512,2K,8K",
                       eval_windows=4, out_dir="out-pycode-cpu"),
    # the CoCA-versus-RoPE extrapolation experiment on one GPU: about 2 minutes on an H100
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
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "vocab_size"}


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
        if key == "vocab_size":
            raise UserError("--vocab_size is set by the tokenizer (--tokenizer=bytes or gpt2)")
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
