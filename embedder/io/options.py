"""How to read sources that are not loose files, every default in one place (light: the CLI reads
it at start-up)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceOptions:
    """How to read sources that are not loose files (defaults in one place, read by the CLI)."""

    image_column: str | None = None  # tables: the image bytes (default: first binary / {bytes, path} column)
    label_column: str | None = None  # tables: the class (default: "label"; ClassLabel ints get their names)
    caption_column: str | None = None  # tables: the caption (default: "caption", "text" or "txt")
    id_column: str | None = None  # tables: a key column for ids (default: ids from the row's location)
    json_label_key: str = "label"  # tar shards: the key of a sample's .json that holds its label
