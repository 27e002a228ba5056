"""Training: the loss falls, resume is exact, checkpoint writes are atomic, DDP over gloo agrees, every
attention and ssmax train, --eval_lengths tracks longer contexts, --init_from converts a model."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from helpers import MICRO, ROOT, run_script, train_micro
from nanococa import checkpoint
from nanococa.errors import UserError

DROPOUT = ["--lr_decay_iters=12", "--dropout=0.1"]  # dropout on, so resume must restore the RNG state too


def run(out_dir, data_dir, *extra):
    return train_micro(out_dir, data_dir, *DROPOUT, *extra)[0]


def train_losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["iter"]: r["loss"] for r in map(json.loads, f) if r["event"] == "train"}


def test_a_few_steps_lower_the_loss(tmp_path, data_dir):
    run(tmp_path, data_dir, "--max_iters=30", "--lr_decay_iters=30", "--eval_interval=30")
    losses = train_losses(tmp_path)
    assert sum(losses[i] for i in range(26, 31)) / 5 < losses[1] - 1.0, losses


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, data_dir):
    run(tmp_path / "full", data_dir, "--max_iters=12", "--eval_interval=4")
    run(tmp_path / "split", data_dir, "--max_iters=6", "--eval_interval=4")  # stops at step 6
    before = checkpoint.load(tmp_path / "split")["seconds"]
    run(tmp_path / "split", data_dir, "--max_iters=12", "--eval_interval=4", "--resume")
    full, split = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 13))
    assert [split[i] for i in range(7, 13)] == [full[i] for i in range(7, 13)]  # bit for bit
    a, b = checkpoint.load(tmp_path / "full"), checkpoint.load(tmp_path / "split")
    assert a["iter"] == b["iter"] == 12
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # the run's wall time counts both parts: the first up to its checkpoint, then the resumed one
    with open(tmp_path / "split" / "log.jsonl") as f:
        end = [r for r in map(json.loads, f) if r["event"] == "end"][-1]
    assert 0 < before and before + end["seconds"] <= end["run_seconds"]
    assert b["seconds"] <= end["run_seconds"] <= b["seconds"] + 5  # the last checkpoint, moments before


@pytest.mark.parametrize("extra", [["--attention=alibi"], ["--attn_scale=ssmax"], ["--attention=coca-slack"]])
def test_every_method_trains(tmp_path, data_dir, extra):
    run(tmp_path, data_dir, "--max_iters=20", "--lr_decay_iters=20", "--eval_interval=20", *extra)
    losses = train_losses(tmp_path)
    assert sum(losses[i] for i in range(16, 21)) / 5 < losses[1] - 0.7, losses
    ckpt = checkpoint.load(tmp_path)
    model, _, _ = checkpoint.load_model(str(tmp_path))  # saved and loaded like any field
    assert ckpt["model_args"]["attention"] == ckpt["train_config"]["attention"] == model.config.attention
    assert model.config.attn_scale == ckpt["model_args"]["attn_scale"]
    if "--attn_scale=ssmax" in extra:  # s is learned: it has moved from its start
        s = ckpt["model"]["transformer.h.0.attn.ssmax"]
        assert not torch.allclose(s, torch.full_like(s, 1 / math.log(64)))


def test_eval_lengths_logs_one_same_targets_perplexity_per_length_at_each_evaluation(tmp_path, data_dir):
    logs = []
    train_micro(tmp_path, data_dir, *DROPOUT, "--max_iters=6", "--eval_interval=3",
                "--eval_lengths=64,128,256", "--eval_windows=2", log=logs.append)
    with open(tmp_path / "log.jsonl") as f:
        evals = [r for r in map(json.loads, f) if r["event"] == "eval"]
    assert [r["iter"] for r in evals] == [3, 6]
    for r in evals:
        assert sorted(map(int, r["ppl_at_length"])) == [64, 128, 256]
        assert all(1 < p < 300 for p in r["ppl_at_length"].values())
    assert evals[0]["ppl_at_length"] != evals[1]["ppl_at_length"]  # the model changed between them
    assert any("ppl@256" in line for line in logs)
    assert any("tracking same-targets perplexity" in line for line in logs)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, data_dir):
    with pytest.raises(UserError, match="no checkpoint"):
        run(tmp_path, data_dir, "--max_iters=2", "--resume")


def test_interrupted_checkpoint_write_keeps_the_good_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    good = {"model": {"w": torch.ones(3)}, "model_args": {}, "tokenizer": "bytes"}
    checkpoint.save(good, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"model": {"w": torch.zeros(3)}, "model_args": {}, "tokenizer": "bytes"}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        checkpoint.load(str(tmp_path))


@pytest.mark.slow
def test_torchrun_two_processes_on_gloo_end_with_identical_weights(tmp_path, data_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "train.py",
           *MICRO, *DROPOUT, "--max_iters=4", "--eval_interval=4", "--grad_accum=2", "--device=cpu",
           f"--out_dir={tmp_path}", f"--data_dir={data_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "weights identical on all 2 processes" in out.stdout
    with open(tmp_path / "log.jsonl") as f:
        end = [r for r in map(json.loads, f) if r["event"] == "end"][0]
    assert len(end["rank_fingerprints"]) == 2 and len(set(end["rank_fingerprints"])) == 1


def test_train_script_reports_bad_options_without_a_trace():
    out = run_script("train.py", "--max_itres=3")
    assert out.returncode == 2 and "unknown option" in out.stderr and "Traceback" not in out.stderr


# --init_from: CoCA dropped into a trained RoPE model

@pytest.fixture(scope="module")
def rope_run(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("rope")
    run(folder, data_dir, "--attention=rope", "--max_iters=8", "--eval_interval=8")
    return folder


@pytest.mark.parametrize("attention, attn_scale", [("coca", "none"), ("coca-slack", "none"),
                                                   ("alibi", "none"), ("coca", "ssmax"), ("rope", "none")])
def test_init_from_keeps_every_weight_and_adds_only_ssmax(tmp_path, data_dir, rope_run, attention,
                                                          attn_scale):
    run(tmp_path, data_dir, f"--init_from={rope_run}", f"--attention={attention}",
        f"--attn_scale={attn_scale}", "--max_iters=0")
    src, new = checkpoint.load(rope_run), checkpoint.load(tmp_path)
    assert new["iter"] == 0 and new["model_args"]["attention"] == attention
    assert new["init_from"] == dict(path=str(rope_run), iter=8, attention="rope", attn_scale="none")
    for k, v in src["model"].items():  # RoPE's key projection is now CoCA's T projection, unchanged
        assert torch.equal(new["model"][k], v), k
    extra = set(new["model"]) - set(src["model"])
    assert extra == ({f"transformer.h.{i}.attn.ssmax" for i in range(1)} if attn_scale == "ssmax" else set())


def test_converted_model_trains_and_resumes_exactly(tmp_path, data_dir, rope_run):
    base = [f"--init_from={rope_run}", "--attention=coca", "--eval_interval=4", "--lr_decay_iters=12"]
    run(tmp_path / "full", data_dir, *base, "--max_iters=12")
    run(tmp_path / "split", data_dir, *base, "--max_iters=6")
    run(tmp_path / "split", data_dir, "--attention=coca", "--eval_interval=4", "--lr_decay_iters=12",
        "--max_iters=12", "--resume")
    full, split = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert [split[i] for i in range(7, 13)] == [full[i] for i in range(7, 13)]
    assert sum(full[i] for i in range(10, 13)) / 3 < full[1]  # the converted model learns
    assert checkpoint.load(tmp_path / "split")["init_from"]["path"] == str(rope_run)  # kept across the resume


@pytest.mark.parametrize("extra, words", [
    (["--n_embd=64"], ["do not fit", "n_embd"]),
    (["--n_layer=2"], ["do not fit", "missing"]),
    (["--tokenizer=gpt2", "--n_embd=32"], ["tokenizer", "bytes"]),
    (["--bias"], ["do not fit"]),
    (["--n_head=4"], ["n_head=2", "each head would mean something else"]),  # same shapes, other heads
])
def test_init_from_refuses_a_model_that_does_not_fit(tmp_path, data_dir, rope_run, extra, words):
    with pytest.raises(UserError) as e:
        run(tmp_path, data_dir, f"--init_from={rope_run}", "--attention=coca", "--max_iters=1", *extra)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not os.path.exists(tmp_path / "ckpt.pt")


@pytest.mark.parametrize("positions", ["pose:2K", "random:1K"])
def test_training_with_position_skips_runs_and_resumes_exactly(tmp_path, data_dir, positions):
    """--positions changes the training batches' positions only: the run trains and resumes bit for bit (the
    positions come from the saved generator); the same first batch and weights give nearly the first loss of a
    contiguous run (attention is near uniform at initialisation), and the runs part from there."""
    run(tmp_path / "full", data_dir, "--max_iters=8", "--eval_interval=4", f"--positions={positions}")
    run(tmp_path / "split", data_dir, "--max_iters=4", "--eval_interval=4", f"--positions={positions}")
    run(tmp_path / "split", data_dir, "--max_iters=8", "--eval_interval=4", f"--positions={positions}",
        "--resume")
    full, split = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert [split[i] for i in range(5, 9)] == [full[i] for i in range(5, 9)]
    plain = train_losses(run(tmp_path / "plain", data_dir, "--max_iters=8", "--eval_interval=4")["out_dir"])
    assert abs(plain[1] - full[1]) < 1e-3 and plain[8] != full[8]
