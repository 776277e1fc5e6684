#!/usr/bin/env bash
# One GPU benchmark run that fits one ~7 minute call, on an image with only jax/flax/optax (no
# pytest, grain, TFDS, array_record or pyarrow; nothing is installed: lmjax runs from this
# checkout via PYTHONPATH).
#
#   bash benchmarks/gpu.sh          # on a GPU box
#   bash benchmarks/gpu.sh --cpu    # the same stages with tiny models on CPU: a rehearsal for CI
#   bash benchmarks/gpu.sh [--cpu] --set model.attention=xla ...   # overrides for every run
#
# Stages, in order (most wanted first, since later ones are skipped when time runs out):
#   env              python, jax/jaxlib/plugin/cuDNN versions, devices; stops the run at once
#                    unless jax sees the GPU (CPU with --cpu)
#   attention-check  `python -m lmjax.attention_check`: every attention kernel this machine runs
#                    against the fp32 reference, forward and gradient (attention_check.json)
#   gpt2_124m, llama_1b, gpt2_774m
#                    benchmarks/throughput.py records (each measures the matmul ceiling too);
#                    gpt2_124m also traces a few steps: its record's "profile" says which kernels
#                    the step's time goes to (trace-gpt2_124m/ keeps the trace)
#   variants         benchmarks/step_variants.py: gpt2_124m's step with one change at a time
#                    (XLA gemm options, batch size per card) against the same ceiling
#   gpt2_124m-packed the same as gpt2_124m on packed documents
#   generate         benchmarks/generate_speed.py: gpt2_124m prefill and greedy decode, batch 1 and 8
#   plan-check       benchmarks/plan_check.py: `lmjax.plan`'s memory estimate against XLA's memory
#                    analysis of the compiled bf16 step (gpt2_124m, llama_1b; a couple of remat policies)
#
# Everything goes to ${OUT:-benchmarks/results/gpu-run}: per stage a log (NAME.log) and a line in
# stages.jsonl ({"stage", "rc", "ok", "seconds", "limit_s"}) written as it ends, the JSON records
# and the machine's description (machine.txt). A throughput record is first written as soon as
# its step compiles ("complete": false, with XLA's memory analysis), so a stage that runs out of
# memory or time still leaves that. A stage that fails or times out is recorded and the next one
# runs. Each stage has its own time limit, and all of them together at most
# ${LMJAX_BENCH_BUDGET_S:-420} seconds (a stage is cut short, or skipped, to stay within it).
# LMJAX_BENCH_SKIP="variants plan-check" skips the stages it names (a rerun of the others).
set -u
START=$SECONDS

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
# llama_1b at seq 2048 needs ~54 GB on an 80 GB card: more than JAX's default 75% pool leaves.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
if [[ -z "${PYTHON:-}" ]]; then # the first interpreter that has jax (python may not be python3)
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import jax' 2>/dev/null; then
      PYTHON=$(command -v "$candidate") && break
    fi
  done
  PYTHON=${PYTHON:-python3} # none has jax: the env stage says so
fi
BUDGET=${LMJAX_BENCH_BUDGET_S:-420}
KILL_AFTER=5 # seconds between timeout's TERM and KILL
: >"$OUT/stages.jsonl"

# skip NAME WHY [OK]: record a stage that did not run (OK=null: as asked, not a failure).
skip() {
  echo "{\"stage\": \"$1\", \"rc\": null, \"ok\": ${3:-false}, \"skipped\": \"$2\"}" >>"$OUT/stages.jsonl"
  echo "[$1] skipped: $2"
}

# stage NAME LIMIT_S COMMAND...: run it under `timeout`, log to OUT/NAME.log, record the outcome;
# returns the command's status. The limit is cut to what is left of the budget.
stage() {
  local name=$1 limit=$2 left rc ok t0
  shift 2
  if [[ " ${LMJAX_BENCH_SKIP:-} " == *" $name "* ]]; then
    skip "$name" "named in LMJAX_BENCH_SKIP" null
    return 0
  fi
  left=$((BUDGET - (SECONDS - START) - KILL_AFTER))
  if ((left < 10)); then
    skip "$name" "the ${BUDGET}s budget is spent"
    return 124
  fi
  ((limit > left)) && limit=$left
  t0=$SECONDS
  timeout --kill-after=$KILL_AFTER "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  ok=false
  ((rc == 0)) && ok=true
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"ok\": $ok, \"seconds\": $((SECONDS - t0)), \"limit_s\": $limit}" \
    >>"$OUT/stages.jsonl"
  echo "[$name] rc=$rc ok=$ok $((SECONDS - t0))s: $(tail -n 1 "$OUT/$name.log")"
  return $rc
}

TP=("$PYTHON" benchmarks/throughput.py --out "$OUT" ${EXTRA[@]+"${EXTRA[@]}"})

if ((CPU)); then
  export JAX_PLATFORMS=cpu
  BACKEND=cpu
  COMMON=(--steps 3 --warmup 1)
  TINY=(--set model.d_model=64 --set model.n_layers=2 --set model.n_heads=4 --set model.d_ff=128
    --set model.seq_len=128 --set train.batch_size=8 --set model.vocab_size=512
    --set model.dtype=float32)
  GPT2_124M=("${TINY[@]}")
  GPT2_774M=("${TINY[@]}")
  LLAMA_1B=("${TINY[@]}" --set model.n_kv_heads=2)
  # seconds: attention-check, gpt2_124m, llama_1b, gpt2_774m, variants, gpt2_124m-packed, generate,
  # plan-check
  LIMIT=(90 60 60 60 90 60 60 150)
  VARIANTS=(--variant base= --variant batch16=train.batch_size=16)
  GENERATE=(--prompt-len 32 --new-tokens 8 --repeats 1)
else
  BACKEND=gpu
  COMMON=(--steps 30 --warmup 2)
  GPT2_124M=(--set train.batch_size=16 --set model.seq_len=1024)
  GPT2_774M=(--set train.batch_size=8 --set model.seq_len=1024)
  LLAMA_1B=()
  # Cold compiles on an H100 (the cache dir is usually fresh on a rented box).
  LIMIT=(60 90 110 120 150 75 60 150)
  VARIANTS=(--variant base= --variant no_triton_gemm=xla:xla_gpu_enable_triton_gemm=false
    --variant cublaslt=xla:xla_gpu_enable_cublaslt=true --variant batch32=train.batch_size=32)
  GENERATE=(--prompt-len 128 --new-tokens 64)
fi
STAGES=(attention-check gpt2_124m llama_1b gpt2_774m variants gpt2_124m-packed generate plan-check)

{
  echo "date: $(date -u +%FT%TZ)  python: $PYTHON  cpu-rehearsal: $CPU  budget: ${BUDGET}s"
  timeout 10 nvidia-smi 2>/dev/null || echo "(no nvidia-smi)"
  timeout 10 "$PYTHON" -m pip list 2>/dev/null
} >"$OUT/machine.txt" 2>&1

if ! stage env 20 "$PYTHON" benchmarks/throughput.py --env "$BACKEND"; then
  cat "$OUT/env.log"
  for name in "${STAGES[@]}"; do skip "$name" "the env stage failed"; done
  echo "stopped: jax does not see the $BACKEND backend with $PYTHON (see $OUT/env.log)" >&2
  exit 1
fi
cat "$OUT/env.log"

stage attention-check "${LIMIT[0]}" "$PYTHON" -m lmjax.attention_check --out "$OUT/attention_check.json"
stage gpt2_124m "${LIMIT[1]}" "${TP[@]}" --experiment gpt2_124m --profile 3 "${COMMON[@]}" "${GPT2_124M[@]}"
stage llama_1b "${LIMIT[2]}" "${TP[@]}" --experiment llama_1b "${COMMON[@]}" ${LLAMA_1B[@]+"${LLAMA_1B[@]}"}
stage gpt2_774m "${LIMIT[3]}" "${TP[@]}" --experiment gpt2_774m "${COMMON[@]}" "${GPT2_774M[@]}"
stage variants "${LIMIT[4]}" "$PYTHON" benchmarks/step_variants.py --experiment gpt2_124m --out "$OUT" \
  "${COMMON[@]}" "${GPT2_124M[@]}" ${EXTRA[@]+"${EXTRA[@]}"} "${VARIANTS[@]}"
stage gpt2_124m-packed "${LIMIT[5]}" "${TP[@]}" --experiment gpt2_124m --packed "${COMMON[@]}" \
  "${GPT2_124M[@]}"
GPT2_124M_MODEL=() # the generation benchmark takes the model settings, not the batch
if ((CPU)); then GPT2_124M_MODEL=("${TINY[@]}"); fi
stage generate "${LIMIT[6]}" "$PYTHON" benchmarks/generate_speed.py --experiment gpt2_124m --batch 1,8 \
  --out "$OUT" "${GENERATE[@]}" ${GPT2_124M_MODEL[@]+"${GPT2_124M_MODEL[@]}"}
PLAN_CHECK=() # compile-only: the planner's memory estimate against XLA's (tiny fp32 models on CPU)
if ((CPU)); then PLAN_CHECK=(--cpu --first 3); fi # the rehearsal: a few; the rest is CPU-only anyway
stage plan-check "${LIMIT[7]}" "$PYTHON" benchmarks/plan_check.py --out "$OUT" ${PLAN_CHECK[@]+"${PLAN_CHECK[@]}"}

echo "done in $((SECONDS - START))s; results in $OUT"
if grep -q '"ok": false' "$OUT/stages.jsonl"; then
  echo "some stages failed or were skipped: see $OUT/stages.jsonl and the stage logs" >&2
  exit 1
fi
