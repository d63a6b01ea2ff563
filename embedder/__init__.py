"""embedder: transfer learning for image collections.

The Python API (the same functions the CLI and the service call)::

    import embedder
    emb = embedder.Embedder("mobilenet_v2:IMAGENET1K_V1")
    vectors = emb.embed(["a.jpg", "b.jpg"])            # float32 (2, 1280), as `extract` stores them
    embedder.extract(["photos/"], "store", backbone="mobilenet_v2:IMAGENET1K_V1")
    store = embedder.open_store("store")                # len(store), .table(), .vectors()
    index = embedder.build_index("store", "photos")     # recall measured against exact search
    hits = index.search(["query.jpg"], k=5)             # per query: Hit(id, path, label, score, rank)
    probe = embedder.train_probe("store", test_store="test_store")
    probe.predict(["new.jpg"])
    embedder.inspect("store", "report", test="test_store")  # duplicates, leaks, label errors, outliers
    probe = embedder.train_probe("pool", labels="labels.csv", test_store="test_store")
    probe.metrics["curve"]                              # accuracy against the number of labels
    embedder.finetune(["train/"], "ck.safetensors", val=["val/"], backbone="timm:vit_small_patch14_dinov2")
    embedder.export("ck.safetensors", "deploy/")         # one ONNX model + its preprocessing and classes

Attributes load on first use, so ``import embedder`` costs what the CLI's start-up does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embedder._version import __version__

__all__ = ["Embedder", "Hit", "Index", "Probe", "build_index", "compare", "dedup", "export", "extract", "finetune",
           "import_vectors", "inspect", "open_index", "open_store", "select", "train_probe", "zero_shot", "__version__"]

if TYPE_CHECKING:
    from embedder.api import (
        Embedder,
        Hit,
        Index,
        Probe,
        build_index,
        compare,
        dedup,
        export,
        extract,
        finetune,
        import_vectors,
        inspect,
        open_index,
        open_store,
        select,
        train_probe,
        zero_shot,
    )


def __getattr__(name: str) -> Any:
    if name in __all__ and name != "__version__":
        from embedder import api

        return getattr(api, name)
    raise AttributeError(f"module 'embedder' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
