"""Training configuration: named presets, one dataclass, and the options of train.py.

    python train.py --preset=pycode-cpu --attention=rope --max_iters=100

TrainConfig extends the model's GPTConfig, so every model field (n_layer, attention, attn_scale,
rope_base, attn_impl, ...) is an option with the model's own checks, and nothing is copied by hand;
vocab_size alone is not an option: the tokenizer sets it. Each field carries its help (model.option),
written once; the parser is built from the fields. A preset sets the defaults; each option then replaces
one field (`--key=value` or `--key value`; `--flag` alone sets a boolean to true; dashes may stand for
underscores). An unknown key or a value that cannot be meant (a negative learning rate, a beta outside
[0, 1), a number that is not finite) is one clear error, raised before any data is prepared.
"""
import argparse
import dataclasses
import math
from dataclasses import dataclass

from .common import DEVICES, DTYPES, POSITIONS_HELP, parse_lengths, parse_positions
from .errors import ArgumentParser, UserError
from .model import SDPA_QK, GPTConfig, option
from .tokenizer import TOKENIZERS, VOCAB_SIZES

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


@dataclass
class TrainConfig(GPTConfig):
    preset: str = option("shakespeare-cpu", "named defaults: " + ", ".join(PRESETS)
                         + " (every other option replaces one of them)")
    # data
    corpus: str = option("shakespeare", "shakespeare, pycode, text:PATH (a file or folder) or "
                                        "hf:NAME[:CONFIG]")
    tokenizer: str = option("bytes", " | ".join(TOKENIZERS))
    data_dir: str = option("data_cache", "where tokenized corpora are cached")
    # optimisation
    batch_size: int = option(8, "sequences per micro-batch (per process under DDP)")
    grad_accum: int = option(1, "micro-batches per step, summed over all processes")
    max_iters: int = option(600, "optimizer steps in all")
    learning_rate: float = option(2e-3, "peak learning rate")
    min_lr: float = option(2e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = option(40, "steps of linear warm-up")
    lr_decay_iters: int = option(0, "step at which the cosine decay ends (0: max_iters)")
    weight_decay: float = option(0.1, "AdamW weight decay of the matrices")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.99, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    # evaluation, logging, checkpoints
    eval_interval: int = option(150, "steps between evaluations and checkpoints")
    eval_iters: int = option(20, "batches per split for the train/val loss")
    eval_lengths: str = option("", "also track same-targets perplexity at these lengths, e.g. 512,2K,8K")
    eval_windows: int = option(2, "validation windows per length for --eval_lengths")
    passkey_mix: float = option(0.0, "fraction of training rows replaced by passkey texts (teaches "
                                     "retrieval)")
    passkey_trials: int = option(32, "with --passkey_mix: passkey trials at block_size at each evaluation")
    passkey_stop: float = option(0.0, "with --passkey_mix: end the run two evaluations after passkey "
                                      "accuracy first reaches this (0: never)")
    positions: str = option("contiguous", "training positions: " + POSITIONS_HELP
                            + "; evaluation and sampling use contiguous ones")
    log_interval: int = option(10, "steps between progress lines")
    out_dir: str = option("out", "folder of ckpt.pt and log.jsonl")
    resume: bool = option(False, "continue out_dir/ckpt.pt where it stopped")
    overwrite: bool = option(False, "start afresh in an out_dir that holds a checkpoint or a run's log")
    init_from: str = option("", "start from another model's weights: a nanococa checkpoint (its attention "
                                "may change) or hf:MODEL, a pretrained Hugging Face model (smollm2, a .gguf "
                                "file or a save_pretrained folder) converted to --attention")
    # system
    device: str = option("auto", DEVICES)
    dtype: str = option("auto", " | ".join(DTYPES) + " (auto: bf16 autocast on CUDA, float32 elsewhere)")
    compile: bool = option(False, "torch.compile the model")
    flush_denormal: bool = option(True, "CPU only: flush float32 denormal numbers to zero (same losses here, "
                                        "faster ALiBi on some CPUs)")
    seed: int = option(1337, "random seed (same seed and options: same numbers on the CPU)")

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
            raise UserError(f"--passkey_stop={self.passkey_stop} must be an accuracy in [0, 1], and needs "
                            "--passkey_mix")
        if self.resume and self.init_from:
            raise UserError("--resume continues this run, --init_from starts a new one from another's "
                            "weights: give one of them")
        if self.resume and self.overwrite:
            raise UserError("--resume keeps the checkpoint in out_dir, --overwrite replaces it: give one of "
                            "them")
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
            raise UserError(f"--positions={self.positions}: the reach must be at least "
                            f"--block_size={self.block_size}")
        return positions

    def model_args(self):
        """The GPTConfig fields of this run."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(GPTConfig)}

    @property
    def hf_source(self):
        """--init_from=hf:MODEL: the pretrained Hugging Face model this run starts from ("" otherwise)."""
        return self.init_from[3:] if self.init_from.startswith("hf:") else ""


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "vocab_size"}


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
                       description="Train a CoCA (or RoPE, ALiBi) GPT, or fine-tune a pretrained model "
                       "converted to CoCA. A preset sets the defaults (shown here: shakespeare-cpu's); every "
                       "option replaces one of them.")
    shown = {**{name: f.default for name, f in FIELDS.items()}, **PRESETS[TrainConfig.preset]}
    for name in ["preset"] + [n for n in FIELDS if n != "preset"]:
        boolean = FIELDS[name].type in ("bool", bool)
        p.add_argument(f"--{name}", type=value_of(FIELDS[name].type), default=argparse.SUPPRESS,
                       metavar="BOOL" if boolean else "X",
                       help=f"{FIELDS[name].metadata['help']} (default: {shown[name]!r})",
                       **(dict(nargs="?", const=True) if boolean else {}))
    p.add_argument("--vocab_size", type=refuse_vocab_size, help=argparse.SUPPRESS)
    return p


# Model fields that a pretrained Hugging Face model brings with it (--init_from=hf:MODEL): not options then.
PRETRAINED_FIELDS = ("n_layer", "n_head", "n_embd", "bias", "dropout", "rope_base", "attn_scale", "attn_impl",
                     "tokenizer")


def make_config(argv=(), **overrides):
    """TrainConfig from a preset (--preset=..., default shakespeare-cpu) and overrides (argv, then keywords).
    cfg.given names the options given (argv and keywords), as opposed to the preset's defaults."""
    given = {**vars(parser().parse_args(list(argv))), **overrides}
    preset = given.get("preset", TrainConfig.preset)
    if preset not in PRESETS:
        raise UserError(f"--preset={preset!r} is not one of {', '.join(PRESETS)}")
    cfg = TrainConfig(**{**PRESETS[preset], **given, "preset": preset})
    cfg.given = frozenset(given)
    if cfg.hf_source:
        check_pretrained_options(cfg)
    return cfg


def check_pretrained_options(cfg):
    """A run from a pretrained Hugging Face model takes its shape and tokenizer from that model: giving them
    too, or an attention it cannot be converted to, is a mistake."""
    clash = [f"--{k}" for k in PRETRAINED_FIELDS if k in getattr(cfg, "given", ())]
    if clash:
        raise UserError(f"{', '.join(clash)}: a pretrained model brings its own shape and tokenizer "
                        f"(--init_from={cfg.init_from}); leave {'them' if len(clash) > 1 else 'it'} out")
    if cfg.attention not in SDPA_QK:
        raise UserError(f"--attention={cfg.attention}: a pretrained rotary model converts to "
                        f"{', '.join(SDPA_QK)}")
