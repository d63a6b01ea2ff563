"""Apply MobileNetV2's original ImageNet head to the stored penultimate vectors.

If the store's preprocessing and weights loading are right, known photos get their known classes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torchvision import models

from embedder.models.hub import cache_dir
from embedder.store.shards import Store, arrow_to_embeddings


def main(store_path: str, only: str = "") -> None:
    store = Store.open(store_path)
    t = store.read(["path", "embedding"])
    x = torch.from_numpy(arrow_to_embeddings(t.column("embedding")))
    state = torch.load(cache_dir() / "mobilenet_v2-b0353104.pth", map_location="cpu", weights_only=True)
    probs = (x @ state["classifier.1.weight"].T + state["classifier.1.bias"]).softmax(1)
    cats = models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    for path, p in sorted(zip(t.column("path").to_pylist(), probs), key=lambda r: r[0]):
        if only not in path:
            continue
        top = p.topk(1)
        print(f"{Path(path).parent.name:>9}/{Path(path).name:<24} {cats[int(top.indices)]:<20} "
              f"{float(top.values):.2f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
