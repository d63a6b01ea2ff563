"""Turn SOURCE arguments (folders, globs, list files, single images) into image references.

Labels follow the ImageFolder convention: the top-level subfolder under the SOURCE root.
Ids are stable for the same file across runs (a hash of its absolute path), so a rerun can skip
what a store already holds and nothing is ever aligned by row position.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from embedder.errors import SourceError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
LIST_EXTENSIONS = frozenset({".csv", ".tsv", ".parquet", ".txt"})
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class ImageRef:
    id: str
    path: str  # absolute
    label: str | None


def image_id(path: str | os.PathLike[str]) -> str:
    return hashlib.blake2b(os.path.abspath(path).encode(), digest_size=16).hexdigest()


def _ref(path: Path, label: str | None) -> ImageRef:
    p = str(path.absolute())
    return ImageRef(image_id(p), p, label)


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _label_under(root: Path, path: Path) -> str | None:
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def _walk(root: Path) -> Iterable[ImageRef]:
    seen: set[str] = set()  # real paths: a symlink cycle is walked once, not forever
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if _is_image(p):
                yield _ref(p, _label_under(root, p))


def _glob(pattern: str) -> Iterable[ImageRef]:
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if _GLOB_CHARS & set(p))]]
    root = Path(*fixed) if fixed else Path(".")
    for m in sorted(glob.glob(pattern, recursive=True)):
        p = Path(m)
        if p.is_file() and _is_image(p):
            yield _ref(p, _label_under(root, p))


def _read_list(path: Path) -> Iterable[ImageRef]:
    base = path.parent
    suffix = path.suffix.lower()  # LIST.CSV is a CSV list too
    rows: list[tuple[str, str | None]]
    if suffix == ".parquet":
        table = pq.read_table(path)
        cols = table.column_names
        col = "path" if "path" in cols else cols[0]
        paths = table.column(col).to_pylist()
        labels = table.column("label").to_pylist() if "label" in cols else [None] * len(paths)
        rows = [(str(p), None if lab is None else str(lab)) for p, lab in zip(paths, labels)]
    elif suffix in (".csv", ".tsv"):
        with open(path, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            fields = reader.fieldnames or []
            if not fields:
                raise SourceError(f"{path} is empty; expected a header with a 'path' column")
            col = "path" if "path" in fields else fields[0]
            rows = [(r[col], r.get("label") or None) for r in reader if r.get(col)]
    else:
        with open(path) as f:
            rows = [(line.strip(), None) for line in f if line.strip() and not line.startswith("#")]
    for p, label in rows:
        full = Path(p) if os.path.isabs(p) else base / p
        yield _ref(full, label)


def discover(sources: Sequence[str | os.PathLike[str]]) -> list[ImageRef]:
    """Every image reachable from SOURCE arguments, deduplicated, in a stable order."""
    if not sources:
        raise SourceError("no SOURCE given: pass folders, globs, image files or a list file")
    seen: dict[str, ImageRef] = {}
    for src in sources:
        s = str(src)
        p = Path(s)
        if p.is_dir():
            found: Iterable[ImageRef] = _walk(p)
        elif p.is_file() and p.suffix.lower() in LIST_EXTENSIONS:
            found = _read_list(p)
        elif p.is_file():
            if not _is_image(p):
                raise SourceError(
                    f"{s} is neither an image ({', '.join(sorted(IMAGE_EXTENSIONS))}) nor a list "
                    f"file ({', '.join(sorted(LIST_EXTENSIONS))})"
                )
            found = [_ref(p, None)]
        elif _GLOB_CHARS & set(s):
            found = list(_glob(s))
            if not found:
                raise SourceError(f"glob {s!r} matched no images")
        else:
            raise SourceError(f"SOURCE {s} does not exist")
        for ref in found:
            seen.setdefault(ref.id, ref)
    if not seen:
        raise SourceError(f"no images found in {', '.join(str(s) for s in sources)} "
                          f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return list(seen.values())
