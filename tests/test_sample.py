"""sample.py end to end, and sample_next: streaming, seeds, prompts from a corpus, one-line mistakes."""
import pytest
import torch

from helpers import run_main, run_script, save_tiny_checkpoint
from nanococa.model import sample_next


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    save_tiny_checkpoint(folder, block_size=16)
    return folder


def test_sample_streams_and_reports(ckpt):
    out = run_script("sample.py", f"--ckpt={ckpt}", "--prompt=To be", "--max_new_tokens=20",
                     "--scaling=dynamic:4+logn", "--num_samples=2", "--top_p=0.9")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("To be") == 2 and "sample 2/2" in out.stdout
    assert "prefill" in out.stderr and "tok/s" in out.stderr and "peak memory" in out.stderr


def test_same_seed_same_sample(ckpt):
    a, b = (run_main("sample", f"--ckpt={ckpt}", "--max_new_tokens=30", "--seed=3") for _ in range(2))
    assert a[0] == 0 and a[1] == b[1] and len(a[1]) > 10


def test_prompt_from_the_validation_split(ckpt, tmp_path):
    code, out, err = run_main("sample", f"--ckpt={ckpt}", "--prompt_val_tokens=300", "--max_new_tokens=5",
                              f"--data-dir={tmp_path}")
    assert code == 0, err
    assert "the first 300 tokens of hamlet" in err and out.startswith("# Hamlet")


@pytest.mark.parametrize("argv, words", [
    (["--ckpt=/no/such/dir"], ["no checkpoint"]),
    (["--prompt="], ["prompt is empty"]),
    (["--prompt=abcdef", "--max_new_tokens=10", "--max_context=12"], ["exceeds --max_context=12"]),
    (["--prompt=abcdef", "--max-new-tokens=10", "--max-context=12"],
     ["exceeds --max_context=12"]),  # dashes too
    (["--temperature=-1"], ["--temperature"]),
    (["--temperature=nan"], ["--temperature", "finite"]),
    (["--temperature=inf"], ["--temperature", "finite"]),
    (["--top_k=0"], ["--top_k"]),
    (["--top_p=1.5"], ["--top_p"]),
    (["--scaling=yarn:fast"], ["scaling", "yarn"]),
    (["--scaling=dynamic:inf"], ["finite"]),
    (["--rope_scaling=linear:0"], ["at least 1"]),
    (["--prompt_file=/no/such/file"], ["--prompt_file"]),
    (["--prompt=a", "--prompt_val_tokens=5"], ["one of"]),
    (["--device=bogus"], ["--device", "bogus"]),
    (["--device=cuda:7"], ["--device"]),
])
def test_user_mistakes_are_one_clear_line(ckpt, argv, words):
    if not any(a.startswith("--ckpt") for a in argv):
        argv.append(f"--ckpt={ckpt}")
    code, _, err = run_main("sample", *argv)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err


def test_corrupt_checkpoint_is_one_clear_line(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"\\x80garbage")
    code, _, err = run_main("sample", f"--ckpt={tmp_path}")
    assert code == 2 and "not a readable checkpoint" in err


# sample_next on its own

LOGITS = torch.tensor([[0.1, 2.0, -1.0, 1.5, 0.0], [3.0, -2.0, 0.5, 2.9, 1.0]])


def test_temperature_zero_and_top_k_one_and_tiny_top_p_are_argmax():
    argmax = LOGITS.argmax(-1)
    assert torch.equal(sample_next(LOGITS, temperature=0), argmax)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(sample_next(LOGITS, top_k=1, generator=g), argmax)
        assert torch.equal(sample_next(LOGITS, top_p=1e-6, generator=g), argmax)


def test_same_generator_seed_same_tokens():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    a = [sample_next(logits, 0.9, 50, 0.95, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert all(torch.equal(a[0], x) for x in a)
    draws = torch.stack([sample_next(logits, generator=torch.Generator().manual_seed(s)) for s in range(20)])
    assert len({tuple(r.tolist()) for r in draws}) > 1  # different seeds do differ


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, top_p=0.8, generator=g)) for _ in range(400)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8: token 2 is not needed
    seen = {int(sample_next(logits, top_p=0.81, generator=g)) for _ in range(400)}
    assert seen == {0, 1, 2}


def test_top_k_keeps_the_k_largest():
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(LOGITS[:1], top_k=2, generator=g)) for _ in range(300)}
    assert seen == {1, 3}
