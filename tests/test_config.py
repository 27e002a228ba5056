"""--key=value overrides, presets and their errors."""
import pytest

from nanococa.config import PRESETS, make_config
from nanococa.errors import UserError


def test_defaults_and_overrides():
    cfg = make_config(["--max_iters=5", "--attention=rope", "--compile=false", "--resume", "--learning_rate=1e-3"])
    assert (cfg.preset, cfg.max_iters, cfg.attention, cfg.compile, cfg.resume) == ("shakespeare-cpu", 5, "rope", False, True)
    assert cfg.learning_rate == 1e-3


def test_presets_set_defaults_that_overrides_replace():
    cfg = make_config(["--preset=pycode-gpu", "--batch_size=4"])
    assert (cfg.corpus, cfg.tokenizer, cfg.n_layer, cfg.n_embd, cfg.batch_size) == ("pycode", "gpt2", 6, 384, 4)
    assert make_config(["--preset=gpt2-small"]).n_embd == 768


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("attention", ["coca", "rope", "coca-slack"])
def test_every_preset_runs_with_every_attention(preset, attention):
    assert make_config([f"--preset={preset}", f"--attention={attention}"]).attention == attention


@pytest.mark.parametrize("argv, words", [
    (["--max_itres=5"], ["unknown option", "--max_iters", "--preset"]),
    (["--max_iters=five"], ["--max_iters", "five", "int"]),
    (["--compile=maybe"], ["boolean"]),
    (["--attention=alibi"], ["alibi", "coca-slack"]),
    (["--preset=huge"], ["huge", "shakespeare-cpu"]),
    (["--device=tpu"], ["tpu", "cuda"]),
    (["--batch_size=0"], ["batch_size"]),
    (["--max_iters"], ["needs a value"]),
    (["max_iters=5"], ["unknown option"]),
])
def test_bad_options_are_one_clear_error(argv, words):
    with pytest.raises(UserError) as e:
        make_config(argv)
    assert all(w in str(e.value) for w in words)
