"""The GPU check (.ci/gpu_check.sh) run through every stage on the CPU with tiny sizes, so that the script a
short GPU rental depends on cannot rot unnoticed: every stage ends, says its wall time and writes its
results."""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

transformers = pytest.importorskip("transformers")


@pytest.mark.slow
def test_every_stage_of_the_gpu_check_runs_on_the_cpu(tmp_path, data_dir):
    from test_hf import tiny_folder
    cpu = "--device=cpu"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), RUNS=str(tmp_path / "runs"),
               DATA_DIR=data_dir, PROMPT_TOKENS="300", HF_MODEL=tiny_folder(tmp_path / "tiny-llama"),
               TRAIN_ARGS=f"--corpus=shakespeare --tokenizer=bytes --block_size=256 --n_layer=1 --n_head=2 "
                          f"--n_embd=32 --batch_size=2 --max_iters=2 --eval_interval=2 --eval_iters=1 "
                          f"--passkey_trials=2 --compile=false {cpu}",
               EVAL_ARGS=f"--lengths 256,512 --windows 1 --target 128 --passkey_trials 2 {cpu}",
               SAMPLE_ARGS=cpu,
               HF_ARGS=f"--corpus=shakespeare --block_size=64 --batch_size=2 --max_iters=2 --eval_interval=2 "
                       f"--eval_iters=1 {cpu}",
               HF_EVAL_ARGS=f"--lengths=64,128 --windows=1 --target=32 {cpu}",
               BENCH_ARGS=f"--quick {cpu} --lengths=64 --prompt=64 --new_tokens=4 --warmup=0 --repeats=1 "
                          "--train_repeats=1 --no_compile")
    env.pop("PYTHONPATH", None)
    p = subprocess.run(["bash", ".ci/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    log = (tmp_path / "out" / "log.txt").read_text()
    for stage in ("train", "eval", "hf", "tests", "bench"):
        assert f"== stage {stage} done in" in log, stage
    out = tmp_path / "out"
    rows = json.load(open(out / "results.json"))["results"]
    assert {r["attention"] for r in rows} == {"coca", "rope", "alibi"}
    hf_rows = json.load(open(out / "hf" / "results.json"))["results"]
    assert {r["attention"] for r in hf_rows} == {"coca", "rope"}
    assert json.load(open(out / "bench.json"))["attention"]
    assert sorted(os.listdir(out / "train")) == ["log-alibi.jsonl", "log-coca.jsonl", "log-rope.jsonl"]
