"""Training configuration: one dataclass, named presets, and the options of train.py.

    python train.py --preset=pycode-cpu --attention=rope --max_iters=100

TrainConfig extends the model's GPTConfig, so every model field (n_layer, attention, attn_scale,
rope_base, attn_impl, ...) is an option with the model's own checks, and nothing is copied by hand;
vocab_size alone is not an option: the tokenizer sets it. A preset sets the defaults; each option
then replaces one field (`--key=value` or `--key value`; `--flag` alone sets a boolean to true; dashes
may stand for underscores). An unknown key or a value that cannot be meant (a negative learning rate,
a beta outside [0, 1), a number that is not finite) is one clear error, raised before any data is prepared.
"""
import argparse
import dataclasses
import math
from dataclasses import dataclass

from .common import DEVICES, DTYPES, POSITIONS_HELP, parse_lengths, parse_positions
from .errors import ArgumentParser, UserError
from .model import ATTENTIONS, ATTN_IMPLS, ATTN_SCALES, GPTConfig
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
    passkey_mix: float = 0.0  # fraction of training rows replaced by passkey texts
    passkey_trials: int = 32  # with the mix on: passkey trials at block_size at each evaluation
    passkey_stop: float = 0.0  # with the mix on: end two evaluations after passkey accuracy first reaches this
    positions: str = "contiguous"  # training positions: contiguous, pose:R or random:R (inference: contiguous)
    log_interval: int = 10
    out_dir: str = "out"
    resume: bool = False  # continue out_dir/ckpt.pt where it stopped
    overwrite: bool = False  # start afresh in an out_dir that holds a checkpoint
    init_from: str = ""  # start from another checkpoint's weights (its attention may change)
    # system
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, float32 elsewhere), float32, bfloat16, float16
    compile: bool = False
    flush_denormal: bool = True  # CPU: flush float32 denormals to zero (same losses, faster ALiBi on some CPUs)
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
        for key in ("batch_size", "grad_accum", "eval_iters", "eval_windows", "log_interval", "eval_interval",
                    "passkey_trials"):
            if getattr(self, key) < 1:
                raise UserError(f"--{key}={getattr(self, key)} must be at least 1")
        for key in ("max_iters", "warmup_iters", "lr_decay_iters", "learning_rate", "min_lr", "weight_decay",
                    "grad_clip"):
            if getattr(self, key) < 0:
                raise UserError(f"--{key}={getattr(self, key)} must not be negative")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise UserError(f"--{key}={getattr(self, key)} must be in [0, 1)")
        if not 0.0 <= self.passkey_mix <= 1.0:
            raise UserError(f"--passkey_mix={self.passkey_mix} must be a fraction in [0, 1]")
        if not 0.0 <= self.passkey_stop <= 1.0 or (self.passkey_stop and not self.passkey_mix):
            raise UserError(f"--passkey_stop={self.passkey_stop} must be an accuracy in [0, 1], and needs --passkey_mix")
        if self.resume and self.init_from:
            raise UserError("--resume continues this run, --init_from starts a new one from another's weights: "
                            "give one of them")
        if self.resume and self.overwrite:
            raise UserError("--resume keeps the checkpoint in out_dir, --overwrite replaces it: give one of them")
        self.tracked_lengths()  # a bad --eval_lengths is found now, not at the first evaluation
        self.training_positions()

    def tracked_lengths(self):
        """--eval_lengths as a sorted list of ints ([] when off)."""
        try:
            return parse_lengths(self.eval_lengths) if self.eval_lengths else []
        except ValueError as e:
            raise UserError(f"--eval_lengths: {e}") from None

    def training_positions(self):
        """--positions as None (contiguous) or (kind, reach)."""
        try:
            positions = parse_positions(self.positions)
        except ValueError as e:
            raise UserError(f"--positions: {e}") from None
        if positions and positions[1] < self.block_size:
            raise UserError(f"--positions={self.positions}: the reach must be at least --block_size={self.block_size}")
        return positions

    def model_args(self):
        """The GPTConfig fields of this run."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(GPTConfig)}


TINY = dict(n_layer=4, n_head=4, n_embd=128, block_size=512)  # 0.83M parameters with bytes
PRESETS = {
    # the default: a byte-level CoCA model on Shakespeare's plays; 600 steps took 2m32s-2m55s on 2 CPU cores
    "shakespeare-cpu": dict(TINY),
    # the paper's effect on a laptop: the same model on Python source, 4x the steps; past 512 bytes of
    # context RoPE breaks and CoCA degrades gently (results/README.md)
    "pycode-cpu": dict(TINY, corpus="pycode", max_iters=2400, eval_interval=240, eval_lengths="512,2K,8K",
                       eval_windows=4, out_dir="out-pycode-cpu"),
    # retrieval on a laptop: pycode-cpu with half its rows passkey texts, 2.5x the steps; every method learns
    # (or fails to learn) passkey retrieval at 512 before its reach beyond is measured (results/README.md)
    "passkey-cpu": dict(TINY, corpus="pycode", passkey_mix=0.5, max_iters=6000, eval_interval=500,
                        eval_lengths="512,2K,8K", eval_windows=4, out_dir="out-passkey-cpu"),
    # the CoCA-versus-RoPE extrapolation experiment on one GPU, GPT-2 tokens
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
HELP = {  # one line per option, in the order of --help
    "preset": "named defaults: " + ", ".join(PRESETS) + " (every other option replaces one of them)",
    "block_size": "training context in tokens",
    "n_layer": "transformer blocks",
    "n_head": "attention heads per block",
    "n_embd": "width of the residual stream",
    "dropout": "dropout probability",
    "bias": "biases in the linear layers and layer norms",
    "attention": " | ".join(ATTENTIONS),
    "attn_impl": " | ".join(ATTN_IMPLS) + ": SDPA form or the literal equations (same numbers)",
    "attn_scale": " | ".join(ATTN_SCALES) + ": ssmax is Scalable-Softmax, s learned per head",
    "rope_base": "rotary base (theta_j = base^(-2j/D))",
    "corpus": "shakespeare, pycode, text:PATH (a file or folder) or hf:NAME[:CONFIG]",
    "tokenizer": " | ".join(TOKENIZERS),
    "data_dir": "where tokenized corpora are cached",
    "batch_size": "sequences per micro-batch (per process under DDP)",
    "grad_accum": "micro-batches per step, summed over all processes",
    "max_iters": "optimizer steps in all",
    "learning_rate": "peak learning rate",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_iters": "steps of linear warm-up",
    "lr_decay_iters": "step at which the cosine decay ends (0: max_iters)",
    "weight_decay": "AdamW weight decay of the matrices",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this (0: no clipping)",
    "eval_interval": "steps between evaluations and checkpoints",
    "eval_iters": "batches per split for the train/val loss",
    "eval_lengths": "also track same-targets perplexity at these lengths, e.g. 512,2K,8K",
    "eval_windows": "validation windows per length for --eval_lengths",
    "passkey_mix": "fraction of training rows replaced by passkey texts (teaches retrieval)",
    "passkey_trials": "with --passkey_mix: passkey trials at block_size at each evaluation",
    "passkey_stop": "with --passkey_mix: end the run two evaluations after passkey accuracy first reaches this "
                    "(0: never)",
    "positions": "training positions: " + POSITIONS_HELP + "; evaluation and sampling use contiguous ones",
    "log_interval": "steps between progress lines",
    "out_dir": "folder of ckpt.pt and log.jsonl",
    "resume": "continue out_dir/ckpt.pt where it stopped",
    "overwrite": "start afresh in an out_dir that holds a checkpoint",
    "init_from": "start from another checkpoint's weights (its attention may change)",
    "device": DEVICES,
    "dtype": " | ".join(DTYPES) + " (auto: bf16 autocast on CUDA, float32 elsewhere)",
    "compile": "torch.compile the model",
    "flush_denormal": "CPU only: flush float32 denormal numbers to zero (same losses here, faster ALiBi on some CPUs)",
    "seed": "random seed (same seed and options: same numbers on the CPU)",
}


def value_of(kind):
    """argparse type for a field's annotation; booleans take true/false, yes/no, on/off, 1/0."""
    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(kind, kind)
    if kind is not bool:
        return kind

    def boolean(raw):
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"{raw!r} is not a boolean (true/false)")
    return boolean


def refuse_vocab_size(raw):
    raise argparse.ArgumentTypeError("is set by the tokenizer (--tokenizer=bytes or gpt2), not an option")


def parser():
    p = ArgumentParser(prog="train.py", usage="python train.py [--option=value ...]",
                       description="Train a CoCA (or RoPE, ALiBi) GPT. A preset sets the defaults (shown here: "
                       "shakespeare-cpu's); every option replaces one of them.")
    shown = {**{name: f.default for name, f in FIELDS.items()}, **PRESETS[TrainConfig.preset]}
    for name in ["preset"] + [n for n in FIELDS if n != "preset"]:
        boolean = FIELDS[name].type in ("bool", bool)
        p.add_argument(f"--{name}", type=value_of(FIELDS[name].type), default=argparse.SUPPRESS,
                       metavar="BOOL" if boolean else "X", help=f"{HELP[name]} (default: {shown[name]!r})",
                       **(dict(nargs="?", const=True) if boolean else {}))
    p.add_argument("--vocab_size", type=refuse_vocab_size, help=argparse.SUPPRESS)
    return p


def make_config(argv=(), **overrides):
    """TrainConfig from a preset (--preset=..., default shakespeare-cpu) and overrides (argv, then keywords)."""
    given = {**vars(parser().parse_args(list(argv))), **overrides}
    preset = given.get("preset", TrainConfig.preset)
    if preset not in PRESETS:
        raise UserError(f"--preset={preset!r} is not one of {', '.join(PRESETS)}")
    return TrainConfig(**{**PRESETS[preset], **given, "preset": preset})
