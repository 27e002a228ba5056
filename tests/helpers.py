"""Shared strategies and helpers for the tests."""
import contextlib
import importlib
import io
import os
import subprocess
import sys
from dataclasses import asdict

import torch
from hypothesis import strategies as st

from nanococa import checkpoint, errors
from nanococa.common import parse_scaling
from nanococa.config import make_config
from nanococa.model import GPT, GPTConfig
from nanococa.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# every rotary scaling the model file knows (None: none); YaRN's static factor keeps its ramp non-trivial
ROTARY_SCALINGS = [None] + [parse_scaling(s) for s in ("dynamic:4", "linear:2", "yarn:8", "yarn:dynamic")]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=2e-4)}


@st.composite
def attn_inputs(draw, max_len=300, max_elems=3_000_000):
    """Random (B, H, T, D) q, t, v and a position offset; B*H*T*T*D bounded so naive strict stays cheap."""
    D = 2 * draw(st.integers(1, 64))
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    T = draw(st.integers(1, max(1, min(max_len, int((max_elems / (B * H * D)) ** 0.5)))))
    return dict(B=B, H=H, T=T, D=D, offset=draw(st.integers(0, 100_000)),
                seed=draw(st.integers(0, 2**31 - 1)), scaling=draw(st.sampled_from(ROTARY_SCALINGS)))


def randn(shape, seed, dtype, n=3, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype) for _ in range(n)]


def tiny_gpt(attention="coca", attn_impl="fast", seed=0, dtype=torch.float32, **kw):
    cfg = dict(vocab_size=61, block_size=32, n_layer=2, n_head=2, n_embd=32, attention=attention,
               attn_impl=attn_impl)
    cfg.update(kw)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**cfg)).to(dtype).eval()


def save_tiny_checkpoint(folder, tokenizer="bytes", corpus="shakespeare", **kw):
    """A random-weight model (bytes by default) saved as folder/ckpt.pt, as train.py would write it."""
    model = tiny_gpt(**{"vocab_size": 257, **kw})
    checkpoint.save({"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": tokenizer,
                     "train_config": {"corpus": corpus}, "iter": 0}, os.path.join(folder, "ckpt.pt"))
    return model


def run_main(script, *argv):
    """A script's main(argv) through errors.run_script in this process, as `python script.py argv` would run
    it but without a new interpreter: (exit status, stdout, stderr). An unexpected exception propagates."""
    module = importlib.import_module(script)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            errors.run_script(module.main, [str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def run_script(*argv, timeout=300):
    """Run one of the repository's scripts (or `-m module`) in a fresh interpreter."""
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


# A training run of a few seconds: one layer of width 32 on Shakespeare's bytes, 64-token windows.
MICRO = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=4", "--eval_iters=2",
         "--log_interval=1", "--warmup_iters=2", "--seed=5"]


def train_micro(out_dir, data_dir, *extra, log=None):
    """train.py's job with MICRO sizes into out_dir (the corpus cached in data_dir): (summary, printed lines).
    """
    lines = []
    summary = train(make_config(MICRO + [f"--out_dir={out_dir}", f"--data_dir={data_dir}", *extra]),
                    log=log or lines.append)
    return summary, lines


def text_corpus(folder, n=12, size=400):
    """A text:PATH corpus of n small files in folder/src (every tenth file is validation)."""
    src = folder / "src"
    src.mkdir(exist_ok=True)
    for i in range(n):
        (src / f"f{i:02d}.txt").write_text(f"document {i} " * size)
    return f"text:{src}"
