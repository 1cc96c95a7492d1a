#!/usr/bin/env bash
# DS vs plain step time of llava15-vicuna7b-ds at the paper's real shapes on one GPU (bf16, SD 1.5 at 256 and
# 512 px), in one call. Usage: bash benchmarks/gpu_overhead.sh [REPORT.json] [extra gpu_overhead.py options]
# Not yet run on a GPU. The bf16 components hold about 8 B parameters (16 GB by count); its time is unmeasured.
set -euo pipefail
cd "$(dirname "$0")/.."
report="${1:-gpu_overhead.json}"
shift || true
python="${PYTHON:-.venv/bin/python}"
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: use --smoke on the CPU')"
export OMP_WAIT_POLICY=PASSIVE PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" benchmarks/gpu_overhead.py --json "$report" "$@"
