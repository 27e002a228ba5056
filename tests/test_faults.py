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
from nanococa import checkpoint, data, passkey
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
    elif how == "manifest field of the wrong type":
        m = json.load(open(path("manifest.json")))
        m["splits"]["train"]["tokens"] = str(m["splits"]["train"]["tokens"])
        json.dump(m, open(path("manifest.json"), "w"))
    elif how == "bytes overwritten, same size":
        with open(path("train.bin"), "r+b") as f:
            f.seek(100)
            f.write(b"\xff\xff" * 10)  # token 65535: beyond every vocabulary


@pytest.mark.parametrize("how", ["truncated bin", "deleted bin", "empty offsets", "wrong offsets",
                                 "empty manifest", "manifest not a dict", "manifest without splits",
                                 "manifest field of the wrong type",
                                 "bytes overwritten, same size"])
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
        with pytest.raises(UserError, match="is in use: another process holds it"):
            run(tmp_path, data_dir, "--max_iters=1")
    assert not os.path.exists(tmp_path / "ckpt.pt")


@pytest.mark.parametrize("what", ["loss", "weights"])
def test_a_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch,
                                                                            what):
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
    where = "step 7: the loss" if what == "loss" else "step 8: the weights"
    assert "not finite" in str(e.value) and where in str(e.value)
    kept = checkpoint.load(tmp_path)
    assert kept["iter"] == 4 and all(torch.equal(kept["model"][k], good["model"][k]) for k in good["model"])


# 3. --resume with changed options

def test_resume_refuses_a_different_model_and_reports_what_may_change(tmp_path, data_dir):
    run(tmp_path, data_dir, "--max_iters=2", "--eval_interval=2")
    for bad, name in (("--attention=rope", "attention"), ("--block_size=32", "block_size"),
                      ("--n_layer=2", "n_layer"), ("--corpus=pycode", "corpus")):
        with pytest.raises(UserError) as e:
            run(tmp_path, data_dir, "--max_iters=4", "--resume", bad)
        assert name in str(e.value) and "there" in str(e.value), str(e.value)
    _, lines = run(tmp_path, data_dir, "--max_iters=4", "--eval_interval=4", "--learning_rate=1e-3",
                   "--resume")
    assert "resume: max_iters 2 -> 4" in lines and "resume: learning_rate 0.002 -> 0.001" in lines
    saved = checkpoint.load(tmp_path)
    assert saved["iter"] == 4 and saved["train_config"]["max_iters"] == 4
    assert saved["train_config"]["learning_rate"] == 1e-3
    assert saved["model_args"]["attention"] == saved["train_config"]["attention"] == "coca"


# 4. values that would train wrong: test_config.py covers the options; devices here

@pytest.mark.parametrize("script, argv", [("train", ["--device=mps"]), ("train", ["--device=cuda:3"]),
                                          ("train", ["--device=bogus"]),
                                          ("eval_length", ["--device", "tpu"])])
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
        train(make_config([f"--corpus=text:{src}", f"--out_dir={tmp_path / 'out'}",
                           f"--data_dir={tmp_path / 'd'}"]), log=lambda *a: None)
    assert not os.path.exists(tmp_path / "out" / "log.jsonl")  # not one step was taken


def test_an_out_dir_that_is_a_file_fails_before_data_preparation(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(UserError, match="is a file"):
        train(make_config([f"--out_dir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'd'}"]),
              log=lambda *a: None)
    assert not os.path.exists(tmp_path / "d")


def test_tracked_lengths_longer_than_any_validation_document_fail_at_start(tmp_path, data_dir):
    with pytest.raises(UserError, match="validation document"):
        run(tmp_path, data_dir, "--eval_lengths=512,1000K")


def test_bench_checks_its_output_and_sizes_first():
    for argv, words in ((["--out=/proc/x/bench.json"], ["--out"]), (["--batch=0"], ["--batch"]),
                        (["--lengths=0"], ["lengths"]), (["--heads=-1"], ["--heads"]),
                        (["--head_dim=63"], ["odd"]),
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
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
run_script(lambda argv: data.prepare(argv[0], get_tokenizer("bytes"), argv[1], log=lambda *a: None),
           sys.argv[1:])
"""


def test_a_full_disk_while_preparing_data_is_one_line_and_leaves_no_temporaries(tmp_path):
    name = corpus(tmp_path, n=20, size=2000)  # about 230 KB of text: the limit cuts it off mid-write
    p = subprocess.run([sys.executable, "-c", FULL_DISK, name, str(tmp_path / "cache")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: data: could not write"), p.stderr
    assert p.stderr.count("\n") == 1, p.stderr
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
@pytest.mark.parametrize("sig, code, words", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_on_a_training_run_is_one_line_and_keeps_a_loadable_checkpoint(tmp_path, data_dir,
                                                                                         sig, code, words):
    cmd = [sys.executable, "train.py", *MICRO, "--max_iters=100000", "--eval_interval=1", "--eval_iters=1",
           f"--out_dir={tmp_path}", f"--data_dir={data_dir}"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(tmp_path / "ckpt.pt") and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # a checkpoint is written every step: the signal lands in or near one
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code and words in err and "Traceback" not in err, err[-2000:]
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
    argv = {"sample": [f"--ckpt={tmp_path}"],
            "eval_length": ["--ckpt", tmp_path, f"--out-dir={tmp_path / 'r'}"],
            "train": [f"--out_dir={tmp_path}", "--resume", "--n_layer=2", "--n_head=2", "--n_embd=32",
                      "--block_size=32"]}[script]
    code, _, err = run_main(script, *argv)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err


# 9. evaluation results are written safely (round three, 1)

def eval_rows():
    return [dict(checkpoint="out", attention="coca", attn_scale="none", corpus="c", tokenizer="bytes",
                 scaling="none",
                 protocol="same-targets", length=512, perplexity=5.0, perplexity_lo=4.0, perplexity_hi=6.0,
                 units=2,
                 targets=10, unit_nll=[1.5, 1.7], note=None)]


def test_ctrl_c_while_results_are_written_keeps_them_whole(tmp_path, monkeypatch):
    from nanococa import report
    report.write_outputs(eval_rows(), {"protocol": "same-targets"}, str(tmp_path), plot=False)
    before = json.load(open(tmp_path / "results.json"))
    real_dumps = json.dumps

    def interrupted(*a, **k):
        text = real_dumps(*a, **k)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the new results are being prepared and written
        time.sleep(0.05)
        return text
    monkeypatch.setattr(json, "dumps", interrupted)
    rows = eval_rows() + [dict(eval_rows()[0], length=1024)]
    with pytest.raises(KeyboardInterrupt):
        report.write_outputs(rows, {"protocol": "same-targets"}, str(tmp_path), plot=False)
    monkeypatch.undo()
    after = json.load(open(tmp_path / "results.json"))  # valid JSON: the old results or the new, never half
    new = {"meta": {"protocol": "same-targets"}, "columns": after["columns"], "results": rows}
    assert after in (before, json.loads(json.dumps(new)))
    assert not [f for f in os.listdir(tmp_path) if ".tmp." in f]


def test_a_full_disk_while_results_are_written_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    from nanococa import report
    report.write_outputs(eval_rows(), {}, str(tmp_path), plot=False)
    before = open(tmp_path / "results.json").read()
    monkeypatch.setattr(os, "fsync",
                        lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(UserError, match="disk is full"):
        report.write_outputs(eval_rows() * 2, {}, str(tmp_path), plot=False)
    monkeypatch.undo()
    assert open(tmp_path / "results.json").read() == before
    assert not [f for f in os.listdir(tmp_path) if ".tmp." in f]


def test_eval_length_neither_shares_an_out_dir_nor_replaces_results_unasked(tmp_path):
    save_tiny_checkpoint(tmp_path / "m", block_size=64)
    argv = ["--ckpt", tmp_path / "m", "--lengths", "64", "--target=32", "--windows=1",
            f"--out_dir={tmp_path / 'r'}", f"--data_dir={tmp_path / 'd'}"]
    os.makedirs(tmp_path / "r")
    with file_lock(str(tmp_path / "r" / ".lock")):  # as a running eval_length.py holds it
        code, _, err = run_main("eval_length", *argv)
    assert code == 2 and "is in use" in err
    assert run_main("eval_length", *argv)[0] == 0
    before = open(tmp_path / "r" / "results.json").read()
    code, _, err = run_main("eval_length", *argv)
    assert code == 2 and "--overwrite" in err and open(tmp_path / "r" / "results.json").read() == before
    assert run_main("eval_length", *argv, "--overwrite")[0] == 0


def test_bench_refuses_to_overwrite_a_file_that_is_not_a_bench_result(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"weights")
    code, _, err = run_main("nanococa.bench", "--quick", "--device=cpu", f"--out={ckpt}")
    assert code == 2 and "not a benchmark result" in err and ckpt.read_bytes() == b"weights"


# 10. damaged checkpoints are refused, in every script (round three, 2 and 5)

def rewrite_raw(path, change):
    """Edit a checkpoint as another program would: torch.load, change, torch.save (the digest is not renewed).
    """
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)


@pytest.mark.parametrize("damage, words", [
    ("flipped bytes", ["ckpt.pt"]),
    ("zeroed weights", ["damaged", "digest"]),
    ("nan weights", ["not finite"]),
])
@pytest.mark.parametrize("script", ["sample", "eval_length", "train-init_from", "train-resume"])
def test_a_damaged_checkpoint_is_one_line_in_every_script(tmp_path, data_dir, damage, words, script):
    run(tmp_path / "src", data_dir, "--max_iters=2", "--eval_interval=2")
    path = tmp_path / "src" / "ckpt.pt"
    if damage == "flipped bytes":
        raw = bytearray(path.read_bytes())
        at = len(raw) * 2 // 5
        raw[at:at + 64] = bytes(255 - b for b in raw[at:at + 64])
        path.write_bytes(bytes(raw))
    elif damage == "zeroed weights":
        rewrite_raw(path, lambda c: c["model"]["lm_head.weight"].zero_())
    else:  # saved by nanococa itself, digest and all: only the finiteness check can refuse it
        ckpt = checkpoint.load(path)
        ckpt["model"]["lm_head.weight"][0, 0] = float("nan")
        checkpoint.save(ckpt, str(path))
    argv = {"sample": ["sample", f"--ckpt={path}", "--max_new_tokens=2"],
            "eval_length": ["eval_length", "--ckpt", path, f"--out_dir={tmp_path / 'r'}", "--lengths=64",
                            "--target=32"],
            "train-init_from": ["train", *MICRO, f"--init_from={path}", f"--out_dir={tmp_path / 'new'}",
                                f"--data_dir={data_dir}"],
            "train-resume": ["train", *MICRO, "--resume", f"--out_dir={tmp_path / 'src'}",
                             f"--data_dir={data_dir}", "--max_iters=4"]}[script]
    code, _, err = run_main(*argv)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert "last good checkpoint" not in err and "weights_only" not in err, err


@pytest.mark.parametrize("change, words", [
    (lambda c: c.update(train_config=[1]), ["train_config is not a dict"]),
    (lambda c: c.update(iter="12"), ["iter is '12'"]),
    (lambda c: c.update(rng={"batch": [], "torch": []}), ["rng"]),
    (lambda c: c["model_args"].update(vocab_size=10**9), ["do not fit", "lm_head.weight"]),
])
def test_a_checkpoint_of_the_wrong_shape_or_types_is_one_line_before_anything_is_allocated(tmp_path, data_dir,
                                                                                              change, words):
    run(tmp_path, data_dir, "--max_iters=2", "--eval_interval=2")
    ckpt = checkpoint.load(tmp_path)
    change(ckpt)
    checkpoint.save(ckpt, str(tmp_path / "ckpt.pt"))
    code, _, err = run_main("train", *MICRO, "--resume", f"--out_dir={tmp_path}", f"--data_dir={data_dir}",
                            "--max_iters=4")
    assert code == 2 and err.count("\n") == 1 and all(w in err for w in words), err


def test_a_hostile_pickle_is_refused_without_the_advice_to_load_it_anyway(tmp_path):
    import pickle

    class Hostile:
        def __reduce__(self):
            return (os.system, ("echo owned",))
    with open(tmp_path / "ckpt.pt", "wb") as f:
        pickle.dump({"model": Hostile()}, f)
    code, out, err = run_main("sample", f"--ckpt={tmp_path}")
    assert code == 2 and "refused unread" in err and "weights_only=False" not in err and "owned" not in out


def test_a_full_disk_inside_torch_save_is_one_line_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save({"model": {"w": torch.ones(3)}, "model_args": {}, "tokenizer": "bytes"}, path)

    def short_write(obj, f):  # what torch.save raises when the disk fills after its first bytes
        f.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(UserError, match="disk full"):
        checkpoint.save({"model": {"w": torch.zeros(3)}, "model_args": {}, "tokenizer": "bytes"}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["model"]["w"],
                       torch.ones(3)) and os.listdir(tmp_path) == ["ckpt.pt"]


SAVE_ON_A_FULL_DISK = """
import resource, signal, sys, torch
from nanococa import checkpoint
from nanococa.errors import run_script
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
state = {"model": {"w": torch.randn(200_000)}, "model_args": {}, "tokenizer": "bytes"}
run_script(lambda argv: checkpoint.save(state, argv[0]), sys.argv[1:])
"""


def test_a_real_full_disk_during_a_checkpoint_write_is_one_line(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save({"model": {"w": torch.ones(3)}, "model_args": {}, "tokenizer": "bytes"}, str(path))
    p = subprocess.run([sys.executable, "-c", SAVE_ON_A_FULL_DISK, str(path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: could not write the checkpoint"), p.stderr
    assert p.stderr.count("\n") == 1 and torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))


# 11. inputs that used to end in a traceback or a hang (round three, 5 and 7)

@pytest.mark.parametrize("argv, words", [
    (["--temperature=1e-42"], ["--temperature", "overflow"]),
    (["--max_new_tokens=1000000000", "--max_context=2000000000"], ["GiB", "--max_new_tokens"]),
    (["--prompt_file=/dev/zero"], ["--prompt_file=/dev/zero", "longer than"]),
])
def test_sample_inputs_that_cannot_work_are_one_line(tmp_path, argv, words):
    save_tiny_checkpoint(tmp_path, block_size=16)
    code, _, err = run_main("sample", f"--ckpt={tmp_path}", *argv)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err


def test_a_top_p_that_rounds_to_zero_samples_the_most_likely_token(tmp_path):
    save_tiny_checkpoint(tmp_path, block_size=16)
    code, out, err = run_main("sample", f"--ckpt={tmp_path}", "--top_p=1e-300", "--max_new_tokens=5",
                              "--prompt=ab")
    greedy = run_main("sample", f"--ckpt={tmp_path}", "--temperature=0", "--max_new_tokens=5", "--prompt=ab")
    assert code == 0 and out == greedy[1], err


def test_curves_skip_bad_lines_with_a_warning_and_refuse_mixed_corpora(tmp_path):
    good = {"event": "eval", "iter": 10, "ppl_at_length": {"512": 5.0}}
    for name, corpus in (("a", "pycode"), ("b", "shakespeare")):
        (tmp_path / name).mkdir()
        start = {"event": "start", "config": {"corpus": corpus, "attention": "coca"}}
        lines = [json.dumps(start), "{not json", "[1, 2]",
                 json.dumps({"event": "eval", "iter": "x", "ppl_at_length": [1]}), json.dumps(good)]
        (tmp_path / name / "log.jsonl").write_text("\n".join(lines) + "\n")
    code, out, err = run_main("nanococa.report", "curves", tmp_path / "a", f"--out_dir={tmp_path / 'r'}")
    assert code == 0 and "skipped line(s) 2, 3, 4" in err and "step 10" in out
    code, _, err = run_main("nanococa.report", "curves", tmp_path / "a", tmp_path / "b",
                            f"--out_dir={tmp_path / 'r2'}")
    assert code == 2 and "different corpora" in err


# 12. what used to be silently wrong (round three, 6) and misleading (8)

def test_prompt_files_that_are_not_utf8_are_counted_or_refused(tmp_path):
    save_tiny_checkpoint(tmp_path, block_size=16)
    (tmp_path / "some.txt").write_bytes(b"To be or not \xff\xfe to be")
    code, _, err = run_main("sample", f"--ckpt={tmp_path}", f"--prompt_file={tmp_path / 'some.txt'}",
                            "--max_new_tokens=2")
    assert code == 0 and "2 bytes" in err and "not UTF-8" in err
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 12)
    code, _, err = run_main("sample", f"--ckpt={tmp_path}", f"--prompt_file={tmp_path / 'binary.bin'}")
    assert code == 2 and "mostly not text" in err


def test_a_corpus_with_bytes_that_are_not_utf8_says_how_many(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        (src / f"f{i}.txt").write_bytes(b"text \xff\xff " * 50 if i == 3 else b"plain text " * 50)
    logs = []
    data.prepare(f"text:{src}", get_tokenizer("bytes"), str(tmp_path / "c"), log=logs.append)
    assert any("100 bytes in 1 file(s) are not UTF-8" in line for line in logs), logs


def test_resume_after_the_corpus_changed_says_it_is_no_longer_exact(tmp_path):
    name = corpus(tmp_path)
    run(tmp_path / "out", str(tmp_path / "d"), f"--corpus={name}", "--max_iters=2", "--eval_interval=2",
        "--block_size=32")
    with open(tmp_path / "src" / "f00.txt", "a") as f:
        f.write("more text")
    _, lines = run(tmp_path / "out", str(tmp_path / "d"), f"--corpus={name}", "--max_iters=3",
                   "--eval_interval=3", "--block_size=32", "--resume")
    assert any("changed since this run started" in line and "no longer an exact" in line
               for line in lines), lines


def test_the_same_scaling_or_checkpoint_twice_is_evaluated_once(tmp_path):
    save_tiny_checkpoint(tmp_path / "m", block_size=64)
    code, out, err = run_main("eval_length", "--ckpt", tmp_path / "m", tmp_path / "m" / "ckpt.pt",
                              "--lengths=64,128",
                              "--target=32", "--windows=1", "--scalings=dynamic:4,dynamic:4.0",
                              f"--out_dir={tmp_path / 'r'}",
                              f"--data_dir={tmp_path / 'd'}")
    assert code == 0, err
    rows = json.load(open(tmp_path / "r" / "results.json"))["results"]
    assert len(rows) == 2  # one checkpoint, one scaling, 2 lengths


def test_misleading_lines_now_say_what_is_meant(tmp_path, data_dir):
    with pytest.raises(UserError, match="use shorter --eval_lengths"):
        run(tmp_path, data_dir, "--eval_lengths=512,1000K")
    with pytest.raises(UserError, match="neither a regular file nor a folder"):
        data.load_docs("text:/dev/null")
    assert make_config(["--attention=alibi", "--n_embd=30",
                        "--n_head=2"]).attention == "alibi"  # ALiBi: odd is fine
    save_tiny_checkpoint(tmp_path / "alibi", attention="alibi", block_size=16)
    code, _, err = run_main("sample", f"--ckpt={tmp_path / 'alibi'}", "--scaling=dynamic:4+logn",
                            "--max_new_tokens=2")
    assert code == 0 and "ALiBi has no rotary" in err and "logn still applies" in err


# 13. round four: the passkey minimum, logs and locks, damaged results, what a checkpoint may make us read

@pytest.mark.slow
def test_gpt2_passkey_training_at_the_shortest_block_never_dies(tmp_path, data_dir):
    """GPT-2 keys take 1-3 tokens: with the minimum over every key, rows of exactly that length always build
    (before: a random step died with "shorter than its fixed text")."""
    block = passkey.min_length(get_tokenizer("gpt2"))
    summary, _ = run(tmp_path, data_dir, "--tokenizer=gpt2", "--passkey_mix=1.0", f"--block_size={block}",
                     "--max_iters=25", "--eval_interval=25", "--passkey_trials=4", "--n_embd=32")
    assert summary["iters"] == 25


def test_eval_length_on_a_gpt2_checkpoint_notes_lengths_too_short_for_a_passkey(tmp_path):
    save_tiny_checkpoint(tmp_path / "m", tokenizer="gpt2", vocab_size=50304, block_size=64)
    lo = passkey.min_length(get_tokenizer("gpt2"))
    code, _, err = run_main("eval_length", "--ckpt", tmp_path / "m", f"--lengths={lo - 1},{lo}",
                            "--target=32", "--windows=1", "--scalings=none", "--passkey_trials=2",
                            f"--out_dir={tmp_path / 'r'}",
                            f"--data_dir={tmp_path / 'd'}")
    assert code == 0, err
    rows = {r["length"]: r for r in json.load(open(tmp_path / "r" / "results.json"))["results"]}
    assert "at least" in rows[lo - 1]["note"] and rows[lo]["passkey_trials"] == 2


@pytest.mark.parametrize("resume", [False, True])
def test_a_log_that_is_a_symbolic_link_is_refused_and_its_target_untouched(tmp_path, data_dir, resume):
    if resume:
        run(tmp_path, data_dir, "--max_iters=1", "--eval_interval=1")
        os.remove(tmp_path / "log.jsonl")
    elsewhere = tmp_path / "someone-elses-file"
    elsewhere.write_text("precious\n")
    os.symlink(elsewhere, tmp_path / "log.jsonl")
    with pytest.raises(UserError, match="symbolic link"):
        again = ["--resume"] if resume else ["--overwrite"]
        run(tmp_path, data_dir, "--max_iters=2", "--eval_interval=2", *again)
    assert elsewhere.read_text() == "precious\n"


def test_a_fresh_run_keeps_the_log_of_a_run_that_stopped_before_its_first_checkpoint(tmp_path, data_dir):
    (tmp_path / "log.jsonl").write_text('{"event": "start"}\n')
    with pytest.raises(UserError, match="log of a run that saved no checkpoint.*--overwrite"):
        run(tmp_path, data_dir, "--max_iters=1")
    assert (tmp_path / "log.jsonl").read_text() == '{"event": "start"}\n'
    run(tmp_path, data_dir, "--max_iters=1", "--overwrite")


def test_a_full_disk_while_the_log_is_written_is_one_line_and_keeps_the_checkpoint(tmp_path, data_dir,
                                                                                   monkeypatch):
    run(tmp_path, data_dir, "--max_iters=2", "--eval_interval=2")
    good = open(tmp_path / "ckpt.pt", "rb").read()
    from nanococa import trainer
    real_open = trainer.open_new_or_own

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            self.f.close()
    monkeypatch.setattr(trainer, "open_new_or_own", lambda *a: FullDisk(real_open(*a)))
    with pytest.raises(UserError, match="could not write .*log.jsonl.*keeps the last good checkpoint"):
        run(tmp_path, data_dir, "--max_iters=4", "--eval_interval=2", "--resume")
    assert open(tmp_path / "ckpt.pt", "rb").read() == good


def test_a_lock_names_the_program_that_holds_it(tmp_path, data_dir):
    with file_lock(str(tmp_path / ".lock"), owner="eval_length.py"):
        with pytest.raises(UserError, match=r"in use: eval_length.py \(pid \d+\) is writing there"):
            run(tmp_path, data_dir, "--max_iters=1")


@pytest.mark.parametrize("damage, words", [
    ("[1, 2]", ["not an evaluation's results"]),
    ("null", ["not an evaluation's results"]),
    ('{"results": []}', ["not an evaluation's results"]),
    ("string perplexity", ["row 1", "perplexity is '5.0'"]),
    ("nan perplexity", ["row 1", "perplexity is nan"]),
    ("negative perplexity", ["row 1", "perplexity is -5.0"]),
    ("accuracy above one", ["row 1", "passkey_accuracy is 1.5"]),
])
def test_merge_refuses_damaged_results_with_one_line(tmp_path, damage, words):
    from nanococa import report
    report.write_outputs(eval_rows(), {"protocol": "same-targets"}, str(tmp_path / "good"), plot=False)
    (tmp_path / "bad").mkdir()
    doc = json.load(open(tmp_path / "good" / "results.json"))
    row = doc["results"][0]
    changes = {"string perplexity": {"perplexity": "5.0"}, "nan perplexity": {"perplexity": float("nan")},
               "negative perplexity": {"perplexity": -5.0}, "accuracy above one": {"passkey_accuracy": 1.5}}
    if damage in changes:
        row.update(changes[damage])
    text = json.dumps(doc) if damage in changes else damage
    (tmp_path / "bad" / "results.json").write_text(text)
    code, _, err = run_main("nanococa.report", "merge", tmp_path / "good", tmp_path / "bad",
                            f"--out_dir={tmp_path / 'x'}")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "x" / "results.json").exists()


def test_a_corpus_path_named_only_by_a_checkpoint_is_not_read_unasked(tmp_path):
    secret = tmp_path / "private"
    secret.mkdir()
    for name in ("notes.txt", "more.txt"):
        (secret / name).write_text("a secret " * 400)
    save_tiny_checkpoint(tmp_path / "m", corpus=f"text:{secret}", block_size=64)
    sample = [f"--ckpt={tmp_path / 'm'}", "--prompt_val_tokens=10", "--max_new_tokens=1"]
    for script, argv in (("sample", sample),
                         ("eval_length", ["--ckpt", tmp_path / "m", "--lengths=64", "--target=32",
                                          "--windows=1",
                                          f"--out_dir={tmp_path / 'r'}"])):
        code, out, err = run_main(script, *argv, f"--data_dir={tmp_path / 'd'}")
        assert code == 2 and "read only when you name it" in err and "--corpus=text:" in err, err
        assert "secret" not in out
    code, out, err = run_main("sample", *sample, f"--corpus=text:{secret}", f"--data_dir={tmp_path / 'd'}")
    assert code == 0 and "secret" in out, err


def test_a_prompt_file_that_is_a_pipe_is_refused_instead_of_waiting(tmp_path):
    save_tiny_checkpoint(tmp_path, block_size=64)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code, _, err = run_main("sample", f"--ckpt={tmp_path}", f"--prompt_file={fifo}", "--max_new_tokens=1")
    assert code == 2 and "pipe" in err and err.count("\n") == 1, err


def test_a_cache_beyond_an_address_space_limit_is_refused_before_allocation(tmp_path, monkeypatch):
    import resource
    from nanococa import sampling
    save_tiny_checkpoint(tmp_path, block_size=64)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1 << 20, 1 << 20))  # as under ulimit -v 1024
    code, _, err = run_main("sample", f"--ckpt={tmp_path}", "--max_new_tokens=30000")
    assert code == 2 and "GiB free" in err, err
    monkeypatch.undo()

    def exhausted(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(sampling, "timed_generation", exhausted)
    import sample
    monkeypatch.setattr(sample, "timed_generation", exhausted)
    code, _, err = run_main("sample", f"--ckpt={tmp_path}", "--max_new_tokens=3")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: out of memory in generation") and "Traceback" not in err, err


@pytest.mark.slow
def test_ctrl_c_while_torch_is_imported_is_one_line():
    p = subprocess.Popen([sys.executable, "sample.py", "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)  # the script has started; importing torch takes a second or more
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    if p.returncode == 0:
        pytest.skip("torch was imported before the signal arrived")
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
