#!/usr/bin/env bash
# GPU check: llamatier's tracer and GPU step model on a machine with an NVIDIA GPU, in one command.
#
#   bash bench/gpu_check.sh [OUT_DIR]          # default OUT_DIR: gpu-check-<date>
#
# Needs: the CUDA toolkit (nvcc) and driver, cmake, a C/C++ compiler, Python 3.11+, and either
# network access (pip) or the two files below staged. About 5-8 minutes on 16 cores, most of it
# the CUDA build (one architecture: the GPU's own). Steps:
#
# 1. build llama.cpp with CUDA from the source vendored by llama-cpp-python 0.3.36 (the version
#    llamatier pins): shared libllama/libggml, which llama-cpp-python loads through
#    LLAMA_CPP_LIB_PATH (no second build of the Python package), and llama-bench;
# 2. llama-bench on Gemma 3 270M: -ngl 99, -nkvo 0,1, -p 512 -n 128, -d 0,4096 (-o jsonl);
# 3. llamatier validate --llama-bench: the built-in GPU step model (fitted on published rows of
#    other GPUs) predicts these rows, labelled "GPU/model not in the fit"; then calibrate on them;
# 4. trace Gemma with KV on the GPU and with --no-offload-kqv (-nkvo): the C capture reads the
#    attention probabilities back from device memory; calibrate the step-time model on two
#    traces of each placement and validate it on a third; print predicted vs measured.
#
# Staged inputs (no network): LLAMA_CPP_PYTHON_SDIST=path/to/llama_cpp_python-0.3.36.tar.gz,
# LLAMATIER_MODEL=path/to/gemma-3-270m-q4_k_m.gguf. PYTHON=... picks the interpreter of a venv
# that already has llamatier installed (default: .venv, created if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
JOBS=$(nproc)
log() { echo "[gpu_check $(date +%T)] $*"; }

command -v nvidia-smi >/dev/null || { echo "error: no nvidia-smi: run this on a machine with an NVIDIA GPU"; exit 2; }
command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || { echo "error: no nvcc: install the CUDA toolkit"; exit 2; }
export PATH="/usr/local/cuda/bin:$PATH"
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"

PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
  log "creating .venv (llamatier with the demo model)"
  python3 -m venv .venv
  .venv/bin/pip install -q -e '.[demo]'
  PY=.venv/bin/python
fi
MODEL=${LLAMATIER_MODEL:-$("$PY" -c 'from llamatier.demo import demo_model_path; print(demo_model_path())')}

# 1. llama.cpp with CUDA, from llama-cpp-python's own sdist
SRC="$OUT/src"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
  SDIST=${LLAMA_CPP_PYTHON_SDIST:-}
  if [ -z "$SDIST" ]; then
    log "downloading the llama-cpp-python 0.3.36 sdist"
    "$PY" -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$OUT/sdist"
    SDIST=$(ls "$OUT"/sdist/llama_cpp_python-0.3.36.tar.gz)
  fi
  mkdir -p "$SRC"
  tar -xzf "$SDIST" -C "$SRC" --strip-components=1
fi
BUILD="$OUT/build-cuda"
log "building llama.cpp with CUDA (this GPU's architecture only, $JOBS jobs)"
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=native \
  -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF >"$OUT/cmake.log"
cmake --build "$BUILD" -j "$JOBS" --target llama llama-bench >"$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
export LLAMA_CPP_LIB_PATH="$BUILD/bin"
"$PY" -c 'import llama_cpp; print(llama_cpp.llama_print_system_info().decode())' | tee "$OUT/system_info.txt"
grep -q "CUDA" "$OUT/system_info.txt" || { echo "error: llama-cpp-python did not load the CUDA build"; exit 1; }

# 2. llama-bench rows of this GPU
log "llama-bench"
"$BUILD/bin/llama-bench" -m "$MODEL" -ngl 99 -nkvo 0,1 -p 512 -n 128 -d 0,4096 -r 3 -o jsonl >"$OUT/llama-bench.jsonl"
"$BUILD/bin/llama-bench" -m "$MODEL" -ngl 99 -nkvo 0,1 -p 512 -n 128 -d 1024 -r 3 -o jsonl >"$OUT/llama-bench-heldout.jsonl"

# 3. the built-in GPU step model on a GPU and model it never saw, then this GPU's own fit
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
PROFILE=$("$PY" - "$GPU_NAME" <<'EOF'
import sys
from llamatier.llamabench.models import find_gpu_spec
spec = find_gpu_spec(sys.argv[1])
print(spec.profile if spec is not None and spec.profile else "h100-sxm")
EOF
)
log "validate the built-in profile $PROFILE on this GPU's rows"
"$PY" -m llamatier validate --llama-bench "$OUT/llama-bench.jsonl" --profile "$PROFILE" | tee "$OUT/validate-builtin.txt" || true
log "calibrate on this GPU's rows, validate on the held-out depth"
if "$PY" -m llamatier calibrate --llama-bench "$OUT/llama-bench.jsonl" --base "$PROFILE" --partial \
     --out "$OUT/this-gpu.toml" | tee "$OUT/calibrate-gpu.txt"; then
  "$PY" -m llamatier validate --llama-bench "$OUT/llama-bench-heldout.jsonl" --profile "$OUT/this-gpu.toml" \
    | tee "$OUT/validate-gpu.txt" || true
fi

# 4. traces on the GPU: KV on the GPU, and in host memory (-nkvo)
log "tracing Gemma on the GPU"
"$PY" - "$OUT" <<'EOF'
import sys
from llamatier.demo import builtin_prompt
text = (builtin_prompt() + " ") * 4
for n in (700, 1500, 3000):  # about 4 characters per token
    with open(f"{sys.argv[1]}/prompt-{n}.txt", "w", encoding="utf-8") as fh:
        fh.write(text[: n * 4])
EOF
for placement in gpu nkvo; do
  flag=""; [ "$placement" = nkvo ] && flag="--no-offload-kqv"
  for n in 700 1500 3000; do
    "$PY" -m llamatier trace "$MODEL" --n-gpu-layers 99 $flag --ctx 4096 --n-predict 96 --threads 4 \
      --prompt-file "$OUT/prompt-$n.txt" \
      --out "$OUT/trace-$placement-$n" --force >"$OUT/trace-$placement-$n.log"
  done
  "$PY" -m llamatier calibrate "$OUT/trace-$placement-700" "$OUT/trace-$placement-3000" \
    --out "$OUT/steps-$placement.toml" | tee "$OUT/calibrate-$placement.txt"
  "$PY" -m llamatier validate "$OUT/trace-$placement-1500" --profile "$OUT/steps-$placement.toml" \
    | tee "$OUT/validate-$placement.txt"
done
"$PY" -m llamatier inspect "$OUT/trace-gpu-1500" | tee "$OUT/inspect-gpu.txt"
log "done: $OUT"
