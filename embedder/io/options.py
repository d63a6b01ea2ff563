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
    # tables: id_column's keys name the same item in every table (default: a key is one table file's,
    # so two tables with the same keys are different items)
    global_keys: bool = False

    @property
    def id_scheme(self) -> str:
        """How a table row's id is made, as a store's manifest records it: ``location`` (a hash of
        ``FILE#COLUMN/GROUP/ROW``), ``key:COLUMN`` (of the table file and the row's key) or
        ``global-key:COLUMN`` (of the key alone). A store's table rows keep one scheme: another
        would give the same rows other ids, and a rerun would add them again."""
        if self.id_column is None:
            return "location"
        return f"{'global-key' if self.global_keys else 'key'}:{self.id_column}"


def id_scheme_flags(scheme: str) -> str:
    """The ``embedder extract`` options that make table rows' ids by SCHEME (``id_scheme``)."""
    kind, _, column = scheme.partition(":")
    if kind == "key":
        return f"--id-column {column}"
    if kind == "global-key":
        return f"--id-column {column} --global-keys"
    return "no --id-column" if kind == "location" else scheme
