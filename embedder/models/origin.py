"""Which weights a network ran with, down to the SHA-256 of their bytes (recorded in every store)."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class WeightsRef:
    """Which exact weights: identity is the SHA-256 of the bytes, whatever the file is called."""

    kind: str  # registry | seeded | file | finetune | hub (a family's own hub download, e.g. timm)
    name: str  # registry: "MobileNet_V2_Weights.IMAGENET1K_V1"; seeded: "tiny_test.SEED0"; else the file name
    sha256: str
    origin: dict[str, Any] | None = None  # finetune: the pretrained weights it started from

    @property
    def tag(self) -> str | None:
        """The registry tag to rebuild these weights by name (None for files)."""
        if self.kind in ("registry", "seeded"):
            return self.name.rsplit(".", 1)[1]
        return None

    @property
    def needs_file(self) -> bool:
        return self.kind in ("file", "finetune")

    def describe(self) -> str:
        return self.name if self.kind in ("registry", "seeded") else f"{self.kind} {self.name}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WeightsRef:
        if "kind" in d:
            return cls(str(d["kind"]), str(d["name"]), str(d["sha256"]), d.get("origin"))
        # version 1: {"tag": "file:x.pth" | "finetune:x" | "Enum.TAG" | "tiny_test.SEED0", ...}
        tag = str(d["tag"])
        if tag.startswith(("file:", "finetune:")):
            kind, _, name = tag.partition(":")
            return cls(kind, d.get("file") or name, str(d["sha256"]), d.get("origin"))
        return cls("seeded" if tag.endswith(".SEED0") else "registry", tag, str(d["sha256"]))


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, read a MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
