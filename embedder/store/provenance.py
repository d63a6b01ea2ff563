"""How a vector was made: one typed, versioned record (in the spirit of timm's ``PretrainedCfg``).

Written to a store's manifest and to every shard (the run that wrote it), to index, probe and
checkpoint metadata; read back with ``Provenance.from_dict``, which also reads the version-1 dicts
written before this record existed and refuses versions it does not know.

Two questions, answered here and nowhere else:

- ``comparable(other)``: can these vectors be compared with those (a query against an index, a
  probe applied to new images, a test store against a train store)? The same function of the
  pixels: backbone, exact weights bytes, layer, pooling, preprocessing, decoder and compute
  precision. Precision counts, measured (docs/benchmarks.md, "Precision"): bf16-autocast vectors of
  the same images are at median cosine 0.992 (worst 0.968) from fp32 ones; a probe trained on fp32
  vectors loses 2.2 points on bf16 ones, and fp32 queries against a bf16 index share only 71 % of
  their top 10 with the fp32 index's. So queries and predictions are embedded at the precision
  recorded for the index or probe (``embedder.embed.query.embedder_for``).
- ``same_store(other)``: may these vectors share one store? Comparable, and also the same stored
  dtype and normalisation.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from embedder import choices
from embedder.errors import ProvenanceMismatch, StoreError
from embedder.models.origin import WeightsRef
from embedder.models.preprocessing import Preprocessing

# 3: preprocessing's resize_mode, the text tower (tokenizer, context length); 4: the runtime
VERSION = 4
WEIGHT_KINDS = ("registry", "seeded", "file", "finetune")
DECODERS = choices.DECODERS  # a record names the decoder used, never "auto"
PRECISIONS = choices.PRECISIONS

# What the default decoder does beyond resize/crop; recorded so a reader knows.
DECODE_POLICY = {
    "alpha": "composite on white",
    "exif": "transpose",
    "high_bit_depth": "scaled to 8 bit",
    "animated": "first frame",
}


@dataclass(frozen=True)
class Provenance:
    backbone: str
    weights: WeightsRef
    layer: str  # "penultimate" or a module name
    pool: str
    preprocessing: Preprocessing
    dim: int
    # pil | pil-draft (JPEG DCT-domain downscale) | pil-reduce (the same, to 2x the target) |
    # torchvision (torchvision.io) | nvjpeg
    decoder: str = "pil"
    precision: str = "fp32"  # compute precision: fp32 | bf16 | fp16 (autocast)
    normalize: str = "none"  # none | l2
    dtype: str = "float32"  # stored: float32 | float16
    versions: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    version: int = VERSION
    # the text tower that shares this vector space (CLIP-family models): {"tokenizer", "context_length"}
    text: dict[str, Any] | None = None
    # what computed the vectors: {"name": "torch" | "onnxruntime", "version"}; None where not known
    # (records before version 4). Not part of ``comparable``: the runtimes' vectors agree to cosine
    # 0.9999 (checked on every run that uses ONNX Runtime: embedder.models.runtime)
    runtime: dict[str, str] | None = None

    COMPARABLE = ("backbone", "weights", "layer", "pool", "preprocessing", "decoder", "precision", "dim")
    SAME_STORE = (*COMPARABLE, "normalize", "dtype")

    # ---- questions ---------------------------------------------------------------------------
    def _key(self, name: str) -> Any:
        value = getattr(self, name)
        return value.sha256 if name == "weights" else value

    def differences(self, other: Provenance, fields: tuple[str, ...]) -> list[str]:
        return [f for f in fields if self._key(f) != other._key(f)]

    def comparable(self, other: Provenance) -> bool:
        return not self.differences(other, self.COMPARABLE)

    def same_store(self, other: Provenance) -> bool:
        return not self.differences(other, self.SAME_STORE)

    def require(self, other: Provenance, *, store: bool, what: str, fix: str) -> None:
        """Raise ProvenanceMismatch naming the first field that differs (self: what exists)."""
        diffs = self.differences(other, self.SAME_STORE if store else self.COMPARABLE)
        if diffs:
            k = diffs[0]
            raise ProvenanceMismatch(f"{what} made with {k}={_short(self.show(k))}, this would use "
                                     f"{k}={_short(other.show(k))}; {fix}")

    @property
    def has_text(self) -> bool:
        """Whether a text tower shares these vectors' space (text queries, zero-shot): the model has one
        and the vectors are its own image embedding, not a --layer's output (whatever a store written
        before that rule recorded)."""
        return bool(self.text) and self.layer == "penultimate"

    def text_refusal(self, what: str) -> str | None:
        """Why no text can be compared with these vectors, as one line naming WHAT holds them; None: it can."""
        if self.has_text:
            return None
        if self.layer != "penultimate" and self.backbone.startswith("open_clip:"):
            return (f"{what} holds {self.backbone}'s layer {self.layer} activations, not the model's image "
                    "embedding, which is the space its text tower shares: extract without --layer")
        return (f"{what} was made with {self.backbone}, which has no text tower: text needs a CLIP-family "
                "backbone (open_clip:ARCH:PRETRAINED)")

    def show(self, name: str) -> Any:
        value = getattr(self, name)
        if isinstance(value, WeightsRef):
            return f"{value.describe()} (sha256 {value.sha256[:12]})"
        if isinstance(value, Preprocessing):
            return value.to_dict()
        return value

    # ---- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "backbone": self.backbone, "weights": self.weights.to_dict(),
            "layer": self.layer, "pool": self.pool, "preprocessing": self.preprocessing.to_dict(),
            "dim": self.dim, "decoder": self.decoder, "decode_policy": DECODE_POLICY,
            "precision": self.precision, "normalize": self.normalize, "dtype": self.dtype,
            "versions": dict(self.versions), "created_at": self.created_at, "text": self.text,
            "runtime": self.runtime,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Provenance:
        version = int(d.get("version", 1))
        if version > VERSION:
            raise StoreError(f"provenance version {version} is newer than this embedder understands "
                             f"(≤ {VERSION}); upgrade embedder")
        try:
            if version == 1:  # written before the typed record: decode dict, no precision
                decoder = "pil-draft" if (d.get("decode") or {}).get("fast_decode") else "pil"
                precision = "fp32"
            else:
                decoder, precision = str(d["decoder"]), str(d["precision"])
            return cls(
                backbone=str(d["backbone"]), weights=WeightsRef.from_dict(d["weights"]),
                layer=str(d["layer"]), pool=str(d["pool"]),
                preprocessing=Preprocessing.from_dict(d["preprocessing"]), dim=int(d["dim"]),
                decoder=decoder, precision=precision, normalize=str(d.get("normalize", "none")),
                dtype=str(d.get("dtype", "float32")), versions=dict(d.get("versions") or {}),
                created_at=str(d.get("created_at", "")), text=d.get("text"),
                runtime=_runtime(d.get("runtime")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"unreadable provenance record (version {version}): missing or bad {e}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> Provenance:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise StoreError(f"unreadable provenance record: {e}") from None

    def replace(self, **changes: Any) -> Provenance:
        return dataclasses.replace(self, **changes)


def _runtime(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise TypeError("runtime")
    return {"name": value["name"], "version": str(value.get("version", ""))}


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 100 else text[:97] + "..."
