#!/usr/bin/env bash
# The GPU benchmark as one prepared command (see scripts/bench_gpu.py for the rows).
#   bash scripts/bench_gpu.sh                 # on a machine with one GPU: < 8 minutes, one table
#   bash scripts/bench_gpu.sh --smoke         # tiny sizes on CPU: checks the script still works
# Extra arguments (--out FILE.json, --only model,extract,probe,faiss) pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" scripts/bench_gpu.py "$@"
