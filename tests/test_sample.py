"""sample.py end to end: it streams a sample and reports its speed; user mistakes are one clear line."""
import pytest

from helpers import run_script, save_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    save_tiny_checkpoint(folder, block_size=16)
    return folder


def test_sample_streams_and_reports(ckpt):
    out = run_script("sample.py", f"--ckpt={ckpt}", "--prompt=To be", "--max-new-tokens=20", "--rope-scaling=dynamic:4",
                     "--num-samples=2", "--top-p=0.9")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("To be") == 2 and "sample 2/2" in out.stdout
    assert "prefill" in out.stderr and "tok/s" in out.stderr and "peak memory" in out.stderr


def test_same_seed_same_sample(ckpt):
    a, b = (run_script("sample.py", f"--ckpt={ckpt}", "--max-new-tokens=30", "--seed=3") for _ in range(2))
    assert a.returncode == 0 and a.stdout == b.stdout


@pytest.mark.parametrize("argv, words", [
    (["--ckpt=/no/such/dir"], ["no checkpoint"]),
    (["--prompt="], ["prompt is empty"]),
    (["--prompt=abcdef", "--max-new-tokens=10", "--max-context=12"], ["exceeds --max-context=12"]),
    (["--temperature=-1"], ["--temperature"]),
    (["--top-k=0"], ["--top-k"]),
    (["--top-p=1.5"], ["--top-p"]),
    (["--rope-scaling=yarn:2"], ["rope scaling"]),
    (["--prompt-file=/no/such/file"], ["--prompt-file"]),
])
def test_user_mistakes_are_one_clear_line(ckpt, argv, words):
    if not any(a.startswith("--ckpt") for a in argv):
        argv.append(f"--ckpt={ckpt}")
    out = run_script("sample.py", *argv)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert all(w in out.stderr for w in words), out.stderr


def test_corrupt_checkpoint_is_one_clear_line(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"\\x80garbage")
    out = run_script("sample.py", f"--ckpt={tmp_path}")
    assert out.returncode == 2 and "not a readable checkpoint" in out.stderr and "Traceback" not in out.stderr
