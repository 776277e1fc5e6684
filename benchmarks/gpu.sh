#!/usr/bin/env bash
# One GPU benchmark run, about 5 minutes at most, on an image with only jax/flax/optax (no grain,
# TFDS, array_record or pyarrow; nothing is installed: lmjax runs from this checkout via PYTHONPATH).
#
#   bash benchmarks/gpu.sh          # on a GPU box
#   bash benchmarks/gpu.sh --cpu    # the same stages with tiny models on CPU: a rehearsal for CI
#   bash benchmarks/gpu.sh [--cpu] --set model.attention=xla ...   # overrides for every run
#
# Everything goes to ${OUT:-benchmarks/results/gpu-run}: per stage a log (NAME.log) and a line in
# stages.jsonl ({"stage", "rc", "ok", "seconds", "limit_s"}) written as it ends, the JSON records
# of benchmarks/throughput.py, pytest's junit XML and the machine's description. A stage that
# fails or times out is recorded and the next one runs. Each stage has its own time limit, and
# all of them together at most ${LMJAX_BENCH_BUDGET_S:-300} seconds (later stages are skipped).
set -u

CPU=0
if [[ "${1:-}" == "--cpu" ]]; then CPU=1 && shift; fi
if [[ $# -gt 0 && "$1" != "--set" ]]; then
  echo "usage: bash benchmarks/gpu.sh [--cpu] [--set key=value ...]" >&2
  exit 2
fi
EXTRA=("$@") # more --set overrides for every throughput stage, e.g. --set model.remat=dots

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/lmjax-jax-cache}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
BUDGET=${LMJAX_BENCH_BUDGET_S:-300}
START=$SECONDS
: >"$OUT/stages.jsonl"

# stage NAME LIMIT_S COMMAND...: run it under `timeout`, log to OUT/NAME.log, record the outcome.
stage() {
  local name=$1 limit=$2 left rc ok t0
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  if ((left < 10)); then
    echo "{\"stage\": \"$name\", \"rc\": null, \"ok\": false, \"skipped\": \"budget spent\"}" >>"$OUT/stages.jsonl"
    echo "[$name] skipped: the ${BUDGET}s budget is spent"
    return
  fi
  ((limit > left)) && limit=$left
  t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  ok=false
  # pytest exits 5 when no test is selected (-m gpu on a CPU): nothing failed.
  if ((rc == 0)) || { [[ $name == pytest* ]] && ((rc == 5)); }; then ok=true; fi
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"ok\": $ok, \"seconds\": $((SECONDS - t0)), \"limit_s\": $limit}" \
    >>"$OUT/stages.jsonl"
  echo "[$name] rc=$rc ok=$ok $((SECONDS - t0))s: $(tail -n 1 "$OUT/$name.log")"
}

TP=("$PYTHON" benchmarks/throughput.py --out "$OUT" ${EXTRA[@]+"${EXTRA[@]}"})

if ((CPU)); then
  export JAX_PLATFORMS=cpu
  COMMON=(--steps 3 --warmup 1)
  TINY=(--set model.d_model=64 --set model.n_layers=2 --set model.n_heads=4 --set model.d_ff=128
    --set model.seq_len=128 --set train.batch_size=8 --set model.vocab_size=512
    --set model.dtype=float32)
  GPT2_124M=("${TINY[@]}")
  GPT2_774M=("${TINY[@]}")
  LLAMA_1B=("${TINY[@]}" --set model.n_kv_heads=2)
  LIMIT=(60 60 60 60)
else
  COMMON=(--steps 30 --warmup 2)
  GPT2_124M=(--set train.batch_size=16 --set model.seq_len=1024)
  GPT2_774M=(--set train.batch_size=8 --set model.seq_len=1024)
  LLAMA_1B=()
  LIMIT=(75 75 110 110)
fi

{
  echo "date: $(date -u +%FT%TZ)  python: $PYTHON  cpu-rehearsal: $CPU"
  "$PYTHON" --version
  nvidia-smi 2>/dev/null || echo "(no nvidia-smi)"
  "$PYTHON" -m pip list 2>/dev/null
} >"$OUT/machine.txt" 2>&1

stage pytest-gpu 60 "$PYTHON" -m pytest -p no:cacheprovider -m gpu tests/test_attention.py \
  --junitxml="$OUT/pytest-gpu.xml"
stage ceiling 45 "${TP[@]}" --ceiling-only
stage gpt2_124m "${LIMIT[0]}" "${TP[@]}" --experiment gpt2_124m "${COMMON[@]}" "${GPT2_124M[@]}"
stage gpt2_124m-packed "${LIMIT[1]}" "${TP[@]}" --experiment gpt2_124m --packed "${COMMON[@]}" \
  "${GPT2_124M[@]}"
stage gpt2_774m "${LIMIT[2]}" "${TP[@]}" --experiment gpt2_774m "${COMMON[@]}" "${GPT2_774M[@]}"
stage llama_1b "${LIMIT[3]}" "${TP[@]}" --experiment llama_1b "${COMMON[@]}" ${LLAMA_1B[@]+"${LLAMA_1B[@]}"}

echo "done in $((SECONDS - START))s; results in $OUT"
if grep -q '"ok": false' "$OUT/stages.jsonl"; then
  echo "some stages failed or were skipped: see $OUT/stages.jsonl and the stage logs" >&2
  exit 1
fi
