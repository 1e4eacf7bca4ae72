#!/usr/bin/env bash
# One-shot GPU check (issue #9), under 8 minutes on one H100/H200:
#   (a) the GPU-only tests: cuDNN vs blockwise vs float32 reference parity (tests/test_gpu.py)
#   (b) attention fwd+bwd per implementation, bf16, H=128, T=2048..16384
#   (c) the llama_1b train step at seq 2048: remat policies save_linear, full, none at batch 8,
#       then the fastest one at batch 4 and 16: tokens/s, MFU (6N, PaLM, causal), peak memory
#       (an OOM is reported as a row), each policy's step broken down by op category
#       (--profile), and ends with one summary table.
#
#   bash launch/gpu_check.sh            # on the GPU machine, from anywhere
#   bash launch/gpu_check.sh --dry-run  # the same pipeline on CPU at tiny sizes (CI, ~2 min)
#
# Results: $OUT (if set, e.g. by the device runner) or /tmp/gpu_check: log.txt, bench.json,
# pytest.txt, attention_table.json (the GPU's measured attention times: merge its entries into
# llama_jax/model/attention_table.json, which attention_impl=auto reads). The machine needs no network: its Python must have jax (CUDA), flax, optax,
# orbax-checkpoint, sentencepiece and tensorstore. ml_collections (configs/*.py build
# ConfigDicts) is installed from wheels in .whl/ when missing. .whl/ is git-ignored; fill it
# on a machine with network (and carry it along, e.g. the device tool's carry=[".whl"]):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl ml_collections absl-py PyYAML
# (repeat with --python-version 3.10/3.11/3.13 for PyYAML's compiled wheel.)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY="${PYTHON:-python3}"
OUTDIR="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/log.txt"
: >"$LOG"
say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
T0=$(date +%s)

# ml_collections (and its requirements absl-py, PyYAML) from .whl/ when missing.
missing=()
for mod in ml_collections:ml_collections absl:absl-py yaml:PyYAML; do
    "$PY" -c "import ${mod%%:*}" 2>/dev/null || missing+=("${mod##*:}")
done
if ((${#missing[@]})); then
    if compgen -G ".whl/*.whl" >/dev/null; then
        say "installing ${missing[*]} from .whl/ into /tmp/llama_jax_site"
        "$PY" -m pip install -q --no-index --no-deps --target /tmp/llama_jax_site \
            --find-links .whl "${missing[@]}" 2>&1 | tee -a "$LOG"
        export PYTHONPATH="/tmp/llama_jax_site${PYTHONPATH:+:$PYTHONPATH}"
    else
        say "error: ${missing[*]} not importable and no wheels in .whl/ (see this script's header)"
        exit 2
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if ((DRY)); then
    export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=1"
    TEST_TIMEOUT=60 BENCH_TIMEOUT=240
    BENCH=(--config configs/tiny.py --seq 128,256 --attn-heads 4 --attn-head-dim 32
        --attn-block 64 --attn-repeats 2 --config.model.n_layers=2 --config.train.seq_len=64
        --step-batch 8 --step-extra-batches 4 --step-repeats 2 --step-matmul 1024)
else
    export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
    export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
    TEST_TIMEOUT=120 BENCH_TIMEOUT=330
    BENCH=(--config configs/llama_1b.py --seq 2048,4096,8192,16384 --attn-heads 16
        --attn-head-dim 128 --attn-dtype bfloat16 --attn-repeats 5 --attn-ref-max-seq 8192
        --step-batch 8 --step-extra-batches 4,16 --step-repeats 5)
fi
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -1 | tee -a "$LOG"

say "(a) GPU-only tests: tests/test_gpu.py"
timeout "$TEST_TIMEOUT" "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py -rs \
    >"$OUTDIR/pytest.txt" 2>&1
TEST_RC=$?
tail -n 15 "$OUTDIR/pytest.txt" | tee -a "$LOG"
TEST_LINE=$(tail -n 1 "$OUTDIR/pytest.txt")

say "(b, c) attention per implementation; llama step per remat policy and batch"
timeout "$BENCH_TIMEOUT" "$PY" -m launch.benchmark attention step --attn-ablations 0 \
    --attn-table "$OUTDIR/attention_table.json" --profile \
    --step-policies save_linear,full,none --json-out "$OUTDIR/bench.json" "${BENCH[@]}" \
    2>&1 | grep -v -E '^[IW][0-9]{4} ' | tee -a "$LOG"
BENCH_RC=${PIPESTATUS[0]}

echo | tee -a "$LOG"
say "done in $(($(date +%s) - T0)) s; tests rc=$TEST_RC ($TEST_LINE); benchmark rc=$BENCH_RC"
if [[ -s "$OUTDIR/bench.json" ]]; then
    "$PY" -c "from launch.benchmark import print_summary_file as p; p('$OUTDIR/bench.json')" \
        2>&1 | tee -a "$LOG"
else
    say "no benchmark results (see $LOG)"
fi
((TEST_RC == 0 || TEST_RC == 5)) && ((BENCH_RC == 0))
