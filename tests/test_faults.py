"""Nothing lost, nothing silent: each class of user mistake or fault gives one clear line and keeps what was
saved. One test (or a parametrized family) per class; the class names follow the README's list."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import MICRO, ROOT, run_main, save_tiny_checkpoint, text_corpus, train_micro
from nanococa import checkpoint, data
from nanococa.common import file_lock, gpu_peak_flops
from nanococa.config import make_config
from nanococa.errors import UserError
from nanococa.tokenizer import get_tokenizer
from nanococa.trainer import train

run = train_micro
corpus = text_corpus


# 1. a damaged data cache is found and rebuilt

def damage(folder, how):
    path = lambda name: os.path.join(folder, name)  # noqa: E731
    if how == "truncated bin":
        os.truncate(path("train.bin"), 1000)
    elif how == "deleted bin":
        os.remove(path("val.bin"))
    elif how == "empty offsets":
        open(path("train.offsets.npy"), "w").close()
    elif how == "wrong offsets":
        np.save(path("val.offsets.npy"), np.array([0, 5]))
    elif how == "empty manifest":
        open(path("manifest.json"), "w").close()
    elif how == "manifest not a dict":
        json.dump([1, 2], open(path("manifest.json"), "w"))
    elif how == "manifest without splits":
        m = json.load(open(path("manifest.json")))
        del m["splits"]["val"]
        json.dump(m, open(path("manifest.json"), "w"))


@pytest.mark.parametrize("how", ["truncated bin", "deleted bin", "empty offsets", "wrong offsets", "empty manifest",
                                 "manifest not a dict", "manifest without splits"])
def test_a_damaged_cache_is_rebuilt_not_trusted(tmp_path, how):
    tok, name = get_tokenizer("bytes"), corpus(tmp_path)
    folder = data.prepare(name, tok, str(tmp_path / "cache"), log=lambda *a: None)
    good = {s: np.asarray(data.Split(folder, s).tokens).copy() for s in ("train", "val")}
    damage(folder, how)
    logs = []
    assert data.prepare(name, tok, str(tmp_path / "cache"), log=logs.append) == folder
    assert "cannot be used" in logs[0] and "rebuilding" in logs[0]
    for s in ("train", "val"):
        assert np.array_equal(np.asarray(data.Split(folder, s).tokens), good[s])


# 2. runs do not overwrite each other; a non-finite step never replaces a good checkpoint

def test_a_fresh_run_refuses_to_replace_a_checkpoint(tmp_path, data_dir):
    run(tmp_path, data_dir, "--max_iters=2", "--eval_interval=2")
    before = open(tmp_path / "ckpt.pt", "rb").read()
    with pytest.raises(UserError) as e:
        run(tmp_path, data_dir, "--max_iters=2", "--eval_interval=2")
    assert "--resume" in str(e.value) and "--overwrite" in str(e.value)
    assert open(tmp_path / "ckpt.pt", "rb").read() == before
    run(tmp_path, data_dir, "--max_iters=3", "--eval_interval=3", "--overwrite")
    assert checkpoint.load(tmp_path)["iter"] == 3
    events = [json.loads(line)["event"] for line in open(tmp_path / "log.jsonl")]
    assert events.count("start") == 1  # a new log, not a second run appended to the old one


def test_two_runs_cannot_share_an_out_dir(tmp_path, data_dir):
    with file_lock(str(tmp_path / ".lock")):  # as a running train.py holds it
        with pytest.raises(UserError, match="another training run"):
            run(tmp_path, data_dir, "--max_iters=1")
    assert not os.path.exists(tmp_path / "ckpt.pt")


@pytest.mark.parametrize("what", ["loss", "weights"])
def test_a_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch, what):
    run(tmp_path, data_dir, "--max_iters=4", "--eval_interval=4")
    good = checkpoint.load(tmp_path)
    from nanococa import model as model_module
    real_forward, real_clip, calls = model_module.GPT.forward, torch.nn.utils.clip_grad_norm_, []

    def poisoned_loss(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)
        if self.training:
            calls.append(1)
            if len(calls) == 3:  # step 7 of the resumed run: its loss is NaN
                return logits, loss * float("nan")
        return logits, loss

    def poisoned_weights(params, max_norm):
        params = list(params)
        calls.append(1)
        if len(calls) == 4:  # step 8: its loss was fine; after its backward a weight is not
            with torch.no_grad():
                params[0].view(-1)[0] = float("inf")
        return real_clip(params, max_norm)
    if what == "loss":
        monkeypatch.setattr(model_module.GPT, "forward", poisoned_loss)
    else:
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned_weights)
    with pytest.raises(UserError) as e:
        run(tmp_path, data_dir, "--max_iters=8", "--eval_interval=8", "--resume")
    assert "not finite" in str(e.value) and ("step 7: the loss" if what == "loss" else "step 8: the weights") in str(e.value)
    kept = checkpoint.load(tmp_path)
    assert kept["iter"] == 4 and all(torch.equal(kept["model"][k], good["model"][k]) for k in good["model"])


# 3. --resume with changed options

def test_resume_refuses_a_different_model_and_reports_what_may_change(tmp_path, data_dir):
    run(tmp_path, data_dir, "--max_iters=2", "--eval_interval=2")
    for bad, name in (("--attention=rope", "attention"), ("--block_size=32", "block_size"), ("--n_layer=2", "n_layer"),
                      ("--corpus=pycode", "corpus")):
        with pytest.raises(UserError) as e:
            run(tmp_path, data_dir, "--max_iters=4", "--resume", bad)
        assert name in str(e.value) and "there" in str(e.value), str(e.value)
    _, lines = run(tmp_path, data_dir, "--max_iters=4", "--eval_interval=4", "--learning_rate=1e-3", "--resume")
    assert "resume: max_iters 2 -> 4" in lines and "resume: learning_rate 0.002 -> 0.001" in lines
    saved = checkpoint.load(tmp_path)
    assert saved["iter"] == 4 and saved["train_config"]["max_iters"] == 4 and saved["train_config"]["learning_rate"] == 1e-3
    assert saved["model_args"]["attention"] == saved["train_config"]["attention"] == "coca"


# 4. values that would train wrong: test_config.py covers the options; devices here

@pytest.mark.parametrize("script, argv", [("train", ["--device=mps"]), ("train", ["--device=cuda:3"]),
                                          ("train", ["--device=bogus"]), ("eval_length", ["--device", "tpu"])])
def test_an_unavailable_device_is_one_line(script, argv):
    code, _, err = run_main(script, *argv)
    assert code == 2 and err.startswith("error: ") and "--device" in err and err.count("\n") == 1, err


def test_an_unknown_gpu_gets_no_mfu_rather_than_a_guess():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA H200 NVL") == 835e12
    assert gpu_peak_flops("NVIDIA L40S") is None and gpu_peak_flops("Some Future GPU") is None


# 5. checks that come before the long work

def test_a_short_validation_split_is_found_before_training(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text("x" * 2000 + "\n" + "y" * 100)  # its last tenth, the validation text, is ~200 bytes
    with pytest.raises(UserError, match="val split has .* too few for --block_size=512"):
        train(make_config([f"--corpus=text:{src}", f"--out_dir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'd'}"]),
              log=lambda *a: None)
    assert not os.path.exists(tmp_path / "out" / "log.jsonl")  # not one step was taken


def test_an_out_dir_that_is_a_file_fails_before_data_preparation(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(UserError, match="is a file"):
        train(make_config([f"--out_dir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'd'}"]), log=lambda *a: None)
    assert not os.path.exists(tmp_path / "d")


def test_tracked_lengths_longer_than_any_validation_document_fail_at_start(tmp_path, data_dir):
    with pytest.raises(UserError, match="validation document"):
        run(tmp_path, data_dir, "--eval_lengths=512,1000K")


def test_bench_checks_its_output_and_sizes_first():
    for argv, words in ((["--out=/proc/x/bench.json"], ["--out"]), (["--batch=0"], ["--batch"]),
                        (["--lengths=0"], ["lengths"]), (["--heads=-1"], ["--heads"]), (["--head_dim=63"], ["odd"]),
                        (["--preset=huge"], ["huge"]), (["--bogus"], ["unknown option --bogus"])):
        code, _, err = run_main("nanococa.bench", "--quick", "--device=cpu", *argv)
        assert code == 2 and err.startswith("error: ") and all(w in err for w in words), err


# 6. races and collisions in the data cache

PREPARE = """
import sys
from nanococa import data
from nanococa.tokenizer import get_tokenizer
print(data.prepare(sys.argv[1], get_tokenizer("bytes"), sys.argv[2], log=lambda *a: None))
"""


@pytest.mark.slow
def test_two_processes_preparing_one_corpus_at_once_both_succeed(tmp_path):
    name = corpus(tmp_path, n=40, size=5000)
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE, name, str(tmp_path / "cache")], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1000:] for o in outs]
    folder = outs[0][0].strip()
    assert outs[1][0].strip() == folder
    assert data.cache_problem(folder, data.fingerprint(data.load_docs(name)), get_tokenizer("bytes")) is None
    assert not [f for f in os.listdir(folder) if ".tmp" in f]


def test_different_sources_never_share_a_cache_folder(tmp_path):
    tok = get_tokenizer("bytes")
    assert data.corpus_dir("c", "text:c/x_y", tok) != data.corpus_dir("c", "text:c/x/y", tok)


# 7. faults: a full disk, Ctrl-C, a killed run

def test_a_full_disk_while_saving_is_one_line_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save({"model": {"w": torch.ones(3)}, "model_args": {}, "tokenizer": "bytes"}, path)

    def full(obj, f):
        f.write(b"part of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="No space left on device"):
        checkpoint.save({"model": {"w": torch.zeros(3)}, "model_args": {}, "tokenizer": "bytes"}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


FULL_DISK = """
import resource, signal, sys
from nanococa import data
from nanococa.errors import run_script
from nanococa.tokenizer import get_tokenizer
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
run_script(lambda argv: data.prepare(argv[0], get_tokenizer("bytes"), argv[1], log=lambda *a: None), sys.argv[1:])
"""


def test_a_full_disk_while_preparing_data_is_one_line_and_leaves_no_temporaries(tmp_path):
    name = corpus(tmp_path, n=20, size=2000)  # about 230 KB of text: the limit cuts it off mid-write
    p = subprocess.run([sys.executable, "-c", FULL_DISK, name, str(tmp_path / "cache")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: data: could not write") and p.stderr.count("\n") == 1, p.stderr
    folder = data.corpus_dir(str(tmp_path / "cache"), name, get_tokenizer("bytes"))
    assert [f for f in os.listdir(folder) if f != ".lock"] == []  # nothing half-written is left to be trusted
    assert data.prepare(name, get_tokenizer("bytes"), str(tmp_path / "cache"), log=lambda *a: None) == folder


def test_ctrl_c_during_a_checkpoint_write_finishes_the_write_then_interrupts(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    real_save = torch.save

    def interrupted_save(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives in the middle of the write
        time.sleep(0.05)
        real_save(obj, f)
    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"model": {"w": torch.full((3,), 7.0)}, "model_args": {}, "tokenizer": "bytes"}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.full((3,), 7.0))  # complete, not half
    assert os.listdir(tmp_path) == ["ckpt.pt"]


@pytest.mark.slow
def test_ctrl_c_on_a_real_training_run_says_interrupted_and_leaves_a_loadable_checkpoint(tmp_path, data_dir):
    cmd = [sys.executable, "train.py", *MICRO, "--max_iters=100000", "--eval_interval=1", "--eval_iters=1",
           f"--out_dir={tmp_path}", f"--data_dir={data_dir}"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(tmp_path / "ckpt.pt") and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # a checkpoint is written every step: the signal lands in or near one
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    assert checkpoint.load(tmp_path)["iter"] >= 1
    assert not [f for f in os.listdir(tmp_path) if ".tmp." in f]


def test_a_half_written_checkpoint_left_by_a_kill_is_removed_on_the_next_start(tmp_path, data_dir):
    run(tmp_path, data_dir, "--max_iters=2", "--eval_interval=2")
    stale = tmp_path / "ckpt.pt.tmp.999999"
    stale.write_bytes(b"\0" * 4096)  # what SIGKILL during torch.save leaves behind
    _, lines = run(tmp_path, data_dir, "--max_iters=3", "--eval_interval=3", "--resume")
    assert not stale.exists() and any("half-written checkpoint" in line for line in lines)


# 8. checkpoints that do not fit their config

@pytest.mark.parametrize("change, words", [
    (lambda c: c["model_args"].update(n_experts=4), ["unknown fields", "n_experts"]),
    (lambda c: c["model_args"].update(n_head=3), ["model_args", "divisible"]),
    (lambda c: c["model_args"].update(attention="xpos"), ["xpos"]),
    (lambda c: c["model"].update({"lm_head.weight": torch.zeros(5, 5)}), ["lm_head.weight", "shape"]),
    (lambda c: c["model"].pop("transformer.ln_f.weight"), ["missing transformer.ln_f.weight"]),
    (lambda c: c.update(model_args=[1, 2]), ["not a dict"]),
])
@pytest.mark.parametrize("script", ["sample", "eval_length", "train"])
def test_a_checkpoint_that_does_not_fit_its_config_is_one_line(tmp_path, change, words, script):
    save_tiny_checkpoint(tmp_path, vocab_size=320)  # the padded vocabulary train.py gives the bytes tokenizer
    ckpt = checkpoint.load(tmp_path)
    change(ckpt)
    checkpoint.save(ckpt, str(tmp_path / "ckpt.pt"))
    argv = {"sample": [f"--ckpt={tmp_path}"], "eval_length": ["--ckpt", tmp_path, f"--out-dir={tmp_path / 'r'}"],
            "train": [f"--out_dir={tmp_path}", "--resume", "--n_layer=2", "--n_head=2", "--n_embd=32",
                      "--block_size=32"]}[script]
    code, _, err = run_main(script, *argv)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
