"""Measure the curated timm / OpenCLIP entries' facts that `embedder backbones` lists without importing
torch (dim, image size, the image tower's GFLOPs, the hub repository) and print them as the
``MEASURED`` mapping of embedder/models/curated.py. GFLOPs are counted as torchvision counts them (a
multiply-add once: torch's FlopCounterMode / 2), on the image tower at the default input size, with
random weights (the count does not depend on them). Run after changing the curated list."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from embedder.models.curated import CURATED
from embedder.models.features import load_model
from embedder.models.registry import get_backbone


def measure(name: str) -> dict[str, object]:
    entry = get_backbone(name)
    net = entry.build_architecture()
    if entry.head:
        from embedder.models.features import set_module

        set_module(net, entry.head, torch.nn.Identity())
    net.eval()
    pre = entry.preprocessing()
    x = torch.zeros(1, 3, pre.crop_size, pre.crop_size)
    counter = FlopCounterMode(display=False)
    # with autograd on: inference-only fast paths (nn.MultiheadAttention's fused kernel) escape the counter
    # and SDPA as its math (matmuls the counter knows; it has no rule for the CPU flash kernel)
    net.requires_grad_(True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), counter:
        dim = int(net(x).shape[-1])
    source = entry.source
    hub = ""
    if hasattr(source, "tag_cfg"):
        hub = str(source.tag_cfg().get("hf_hub", "")).rstrip("/")
    elif hasattr(source, "cfg"):
        hub = str(getattr(source.cfg(), "hf_hub_id", "") or "")
    return {"dim": dim, "size": pre.crop_size, "gflops": round(counter.get_total_flops() / 2e9, 2), "hub": hub}


def main() -> None:
    _ = load_model  # the same modules the CLI loads
    print("MEASURED: dict[str, dict[str, object]] = {")
    for c in CURATED:
        print(f"    {c.name!r}: {measure(c.name)!r},", flush=True)
    print("}")


if __name__ == "__main__":
    main()
