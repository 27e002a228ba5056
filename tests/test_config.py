"""--key=value overrides, presets, the model fields that come from GPTConfig, and values that cannot be meant.
"""
import dataclasses

import pytest

from nanococa.common import DTYPES
from nanococa.config import FIELDS, PRESETS, TrainConfig, make_config
from nanococa.errors import UserError
from nanococa.model import ATTENTIONS, GPTConfig
from nanococa.tokenizer import TOKENIZERS, VOCAB_SIZES, get_tokenizer


def test_defaults_and_overrides():
    cfg = make_config(["--max_iters=5", "--attention=rope", "--compile=false", "--resume",
                       "--learning_rate=1e-3"])
    assert (cfg.preset, cfg.max_iters, cfg.attention, cfg.compile,
            cfg.resume) == ("shakespeare-cpu", 5, "rope", False, True)
    assert cfg.learning_rate == 1e-3


def test_every_model_field_is_an_option_and_model_args_come_from_gptconfig():
    model_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    assert model_fields - {"vocab_size"} <= set(FIELDS)
    cfg = make_config(["--rope_base=500000", "--attn_impl=naive", "--attn_scale=ssmax", "--attention=alibi"])
    args = cfg.model_args()
    assert set(args) == model_fields
    assert (args["rope_base"], args["attn_impl"], args["attn_scale"],
            args["attention"]) == (500000.0, "naive", "ssmax", "alibi")
    assert GPTConfig(**args).attention == "alibi"


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_vocab_size_comes_from_the_tokenizer(tokenizer):
    assert VOCAB_SIZES[tokenizer] == get_tokenizer(tokenizer).vocab_size
    cfg = make_config([f"--tokenizer={tokenizer}"])
    assert cfg.vocab_size % 64 == 0 and 0 <= cfg.vocab_size - VOCAB_SIZES[tokenizer] < 64
    with pytest.raises(UserError, match="tokenizer"):
        make_config(["--vocab_size=1000"])


def test_presets_set_defaults_that_overrides_replace():
    cfg = make_config(["--preset=pycode-gpu", "--batch_size=4"])
    assert (cfg.corpus, cfg.tokenizer, cfg.n_layer, cfg.n_embd,
            cfg.batch_size) == ("pycode", "gpt2", 6, 384, 4)
    assert make_config(["--preset=gpt2-small"]).n_embd == 768
    cpu = make_config(["--preset=pycode-cpu"])
    assert (cpu.corpus, cpu.tokenizer, cpu.n_embd, cpu.block_size) == ("pycode", "bytes", 128, 512)
    assert cpu.tracked_lengths() == [512, 2048, 8192]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_every_preset_runs_with_every_attention(preset, attention):
    assert make_config([f"--preset={preset}", f"--attention={attention}"]).attention == attention


def test_dtypes_are_defined_once():
    assert TrainConfig.__dataclass_fields__["dtype"].default in DTYPES
    for d in DTYPES:
        assert make_config([f"--dtype={d}"]).dtype == d


@pytest.mark.parametrize("argv, words", [
    (["--max_itres=5"], ["unknown option", "did you mean --max_iters"]),
    (["--max_iters=five"], ["--max_iters", "five", "int"]),
    (["--compile=maybe"], ["boolean"]),
    (["--attention=xpos"], ["xpos", "coca-slack", "alibi"]),
    (["--attn_scale=logn"], ["attn_scale", "ssmax"]),
    (["--preset=huge"], ["huge", "shakespeare-cpu"]),
    (["--device=tpu"], ["tpu", "cuda"]),
    (["--batch_size=0"], ["batch_size"]),
    (["--max_iters"], ["--max_iters", "expected one argument"]),
    (["max_iters=5"], ["unknown option"]),
    (["--n_embd=30", "--n_head=2"], ["odd"]),
    (["--dtype=float64"], ["dtype", "bfloat16"]),
    (["--tokenizer=sentencepiece"], ["tokenizer", "gpt2"]),
    # values that would train wrong without a word
    (["--learning_rate=nan"], ["learning_rate", "finite"]),
    (["--learning_rate=inf"], ["learning_rate", "finite"]),
    (["--learning_rate=-1e-3"], ["learning_rate", "negative"]),
    (["--min_lr=-1"], ["min_lr", "negative"]),
    (["--beta1=1.0"], ["beta1", "[0, 1)"]),
    (["--beta2=-0.1"], ["beta2", "[0, 1)"]),
    (["--grad_clip=-1"], ["grad_clip", "negative"]),
    (["--weight_decay=-0.1"], ["weight_decay", "negative"]),
    (["--dropout=nan"], ["dropout"]),
    (["--rope_base=inf"], ["rope_base", "finite"]),
    (["--eval_lengths=512,abc"], ["eval_lengths"]),
    (["--eval_windows=0"], ["eval_windows"]),
    (["--passkey_mix=1.5"], ["passkey_mix", "[0, 1]"]),
    (["--passkey_mix=-0.1"], ["passkey_mix"]),
    (["--passkey_trials=0"], ["passkey_trials"]),
    (["--passkey_stop=0.9"], ["passkey_stop", "needs --passkey_mix"]),
    (["--positions=pose"], ["--positions", "pose:R"]),
    (["--positions=skip:4K"], ["--positions", "random:R"]),
    (["--positions=random:4K,8K"], ["--positions", "one of"]),
    (["--positions=pose:256"], ["--positions", "at least --block_size=512"]),
    (["--passkey_mix=0.5", "--passkey_stop=1.5"], ["passkey_stop", "[0, 1]"]),
    (["--resume", "--init_from=out"], ["--resume", "--init_from"]),
    (["--resume", "--overwrite"], ["--resume", "--overwrite"]),
])
def test_bad_options_are_one_clear_error(argv, words):
    with pytest.raises(UserError) as e:
        make_config(argv)
    assert all(w in str(e.value) for w in words), str(e.value)
