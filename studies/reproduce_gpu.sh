#!/usr/bin/env bash
# Reproduce the README's GPU numbers on one CUDA GPU, in one go, each step with its own time limit:
#   bash studies/reproduce_gpu.sh [OUT_DIR] [STEP ...]
# STEPs (default: all, in this order): check, kernel, tests, train, gpu_demo, startup, synthetic_table.
#   check            kernel vs the float64 reference, RWKV-7-like and repeated-token inputs (bf16, fp32)
#   kernel           `fsearch bench kernel`: the four shapes, triton / fla (when installed) / torch, one run
#   tests            pytest -m gpu tests/kernels tests/model tests/worker (many kernel variants compile: 4 min 40 s on
#                    an H100 for the first two, with 6 xdist processes)
#   train            `fsearch bench train --compile off on graphs`: 0.1B shape, T 2048 and 4096, triton / fla / torch,
#                    FS off and on, eager, compiled and graph-replayed (the GPU default), each group beside the peer
#                    (fla's RWKV7ForCausalLM, when installed) with the ratio
#   gpu_demo         `fsearch round --spec gpu_demo` (whole round + report; results/gpu_demo)
#   startup          `fsearch bench round --spec gpu_demo` under four settings: a worker per run with eager steps (the
#                    earlier example round's), then one warm worker with eager steps, with eager-graphs (the spec's)
#                    and with graphs; round times,
#                    first-step times, and whether decisions and records agree (rounds under results/bench_round)
#   synthetic_table  `fsearch round --spec synthetic_table` (45 runs + report; results/synthetic_table)
# Everything a step prints goes to OUT_DIR/<step>.log (JSON lines of the benches to OUT_DIR/<step>.jsonl); the
# rounds keep their folders under results/ and resume if run again. FSEARCH overrides the command (default:
# `fsearch`, else `python -m orchestrator.cli` when the console script is not installed); LIMIT_<STEP> the seconds
# a step may take (defaults below).
set -u
out=${1:-results/gpu_reproduce}
shift || true
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(check kernel tests train gpu_demo startup synthetic_table)
mkdir -p "$out"
if [ -z "${FSEARCH:-}" ]; then
  if command -v fsearch >/dev/null 2>&1; then FSEARCH=fsearch; else FSEARCH="python -m orchestrator.cli"; fi
fi
py=${PYTHON:-python}
# A worker process starts per run (defaults.worker: fresh) or per round (warm). Where the Python environment is read-only and ships no bytecode, every process
# compiles torch's modules again (about 5 s per run in a profile of a worker on an H100 machine): keep bytecode in a
# writable place instead.
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-${XDG_CACHE_HOME:-$HOME/.cache}/fsearch/pycache}
# the GPU tests compile many kernel variants: spread them over processes when pytest-xdist is installed
xdist=()
$py -c "import xdist" 2>/dev/null && xdist=(-n 6)

declare -A limit=([check]=600 [kernel]=600 [tests]=900 [train]=1800 [gpu_demo]=1500 [startup]=3600 [synthetic_table]=2400)

run_step() {
  local step=$1 secs
  if [ -z "${limit[$step]+set}" ]; then
    echo "unknown step: $step (known: check kernel tests train gpu_demo startup synthetic_table)"
    return 2
  fi
  secs=$(eval echo "\${LIMIT_${step}:-${limit[$step]}}")
  echo "== $step (limit ${secs}s) -> $out/$step.log"
  local t0=$SECONDS
  case $step in
    check)
      { timeout "$secs" $FSEARCH bench kernel --check --out "$out/check.jsonl" &&
        timeout "$secs" $FSEARCH bench kernel --check --check-inputs repeated \
          --shapes 1x1024x2x64 1x256x2x32 1x300x2x128 --out "$out/check.jsonl"; } ;;
    kernel) timeout "$secs" $FSEARCH bench kernel --out "$out/kernel.jsonl" ;;
    tests) timeout "$secs" $py -m pytest -v ${xdist[@]+"${xdist[@]}"} -m gpu tests/kernels tests/model tests/worker -p no:cacheprovider ;;
    train) timeout "$secs" $FSEARCH bench train --compile off on graphs --out "$out/train.jsonl" ;;
    gpu_demo | synthetic_table) timeout "$secs" $FSEARCH round --spec "$step" ;;
    startup) timeout "$secs" $FSEARCH bench round --spec gpu_demo --variant worker=fresh,compile=off \
               --variant worker=warm,compile=off --variant worker=warm,compile=eager-graphs \
               --variant worker=warm,compile=graphs --json "$out/startup.jsonl" ;;
  esac > "$out/$step.log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - t0)) s"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1 || true
status=0
for s in "${steps[@]}"; do run_step "$s" || status=1; done
exit $status
