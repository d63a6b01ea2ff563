"""Labels as data: a file of (id, label) rows joined to a store by its ``id`` column, overriding the
store's own label (the class folder, a table's label column) where it gives one.

One place reads the file and one place joins it, for every command that takes ``--labels``
(``probe``, ``inspect``, ``compare``, ``finetune``, ``select``), the service's labelling page and
the Python API:

- ``read_labels(FILE)``: Parquet, CSV or TSV (by suffix; anything else is tried as Parquet, then
  CSV) with an ``id`` and a ``label`` column (``class`` is taken for ``label``). Ids and labels are
  read as strings; a row with an empty label is ignored (counted); one id given two different
  labels is refused in one line (the same label twice is one label).
- ``LabelJoin(file).apply(ids, labels)``: record batch by record batch (memory is the file's, never
  the store's), the store's labels with the file's put over them. It counts what it used; after the
  pass, ``result()`` says how many of the file's ids were found, how many were not (ignored, with
  examples), and how many folder labels the file changed; ``require_some()`` refuses a file none of
  whose ids is in the store (the usual mistake: paths or file names where the store's ids are).

The join is Arrow's hash lookup (``pyarrow.compute.index_in``) per batch: the file's ids are hashed
once per batch, so its cost grows with batches × file size — fine for label files of up to ~10⁶ rows
(a user labels thousands), and the store is never held.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import pyarrow as pa

from embedder.errors import EmbedderError
from embedder.io import storage
from embedder.io.uri import is_uri

ID_COLUMN = "id"
LABEL_COLUMN = "label"
LABEL_ALIASES = ("label", "class")
EXAMPLES = 3


class LabelsError(EmbedderError):
    """A labels file that cannot be read or joined."""


@dataclass(frozen=True)
class LabelFile:
    """A labels file's usable rows: unique ids, each with one non-empty label."""

    path: str
    ids: pa.StringArray
    labels: pa.StringArray
    blank: int = 0  # rows with an empty or missing label (ignored)
    repeated: int = 0  # rows repeating an (id, label) pair already given
    sha256: str = ""  # of the file's bytes: which labels made a result
    size: int = 0  # bytes

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def classes(self) -> list[str]:
        import pyarrow.compute as pc

        return sorted(str(v) for v in pc.unique(self.labels).to_pylist())


def _columns(names: list[str]) -> tuple[str | None, str | None]:
    """The id and label columns among NAMES: case and surrounding spaces ignored (``ID``, `` Label``)."""
    plain = {n.strip().lower(): n for n in reversed(names)}  # the first of two spellings wins
    label = next((plain[a] for a in LABEL_ALIASES if a in plain), None)
    return plain.get(ID_COLUMN), label


def _sniff(data: bytes) -> str:
    """The delimiter of a CSV's header line: tab, semicolon or comma (the most frequent; comma on a tie)."""
    head = data[:4096].split(b"\n", 1)[0]
    counts = {d: head.count(d.encode()) for d in (",", "\t", ";")}
    best = max(counts, key=lambda d: (counts[d], d == ","))
    return best if counts[best] else ","


def _read_csv(data: bytes) -> pa.Table:
    import pyarrow.csv as pacsv

    parse = pacsv.ParseOptions(delimiter=_sniff(data))
    header = pacsv.read_csv(pa.BufferReader(data.split(b"\n", 1)[0] + b"\n"), parse_options=parse)
    # every column as text: numeric-looking ids ("001") keep their zeros, labels stay names
    text = pacsv.ConvertOptions(column_types={n: pa.string() for n in header.schema.names})
    return pacsv.read_csv(pa.BufferReader(data), parse_options=parse, convert_options=text)


def _read_table(loc: str) -> pa.Table:
    suffix = Path(loc).suffix.lower()
    if suffix not in (".csv", ".tsv", ".txt"):
        try:
            f = storage.open_parquet(loc)
            ident, label = _columns(f.schema_arrow.names)
            # only the two columns: a store's shard given as a labels file is not read whole
            return f.read(columns=[c for c in (ident, label) if c] or None)
        except (pa.ArrowInvalid, OSError):
            if suffix in (".parquet", ".pq"):
                raise
    return _read_csv(storage.read_bytes(loc))


def _digest(loc: str) -> tuple[str, int]:
    """sha256 and size of the file's bytes (read in 1 MiB pieces): which labels made a result."""
    import hashlib

    h = hashlib.sha256()
    size = 0
    if is_uri(loc):
        data = storage.read_bytes(loc)
        h.update(data)
        return h.hexdigest(), len(data)
    with open(loc, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
            size += len(piece)
    return h.hexdigest(), size


def _short(names: list[str]) -> str:
    shown = ", ".join(repr(n[:40]) for n in names[:6]) + (f" (and {len(names) - 6} more)" if len(names) > 6 else "")
    return shown or "none"


LabelsArg = Union[str, Path, Sequence[Union[str, Path]]]  # one labels file, or several (rounds of labelling)


def read_labels(path: LabelsArg) -> LabelFile:
    """FILE's (id, label) rows (module docstring); a one-line ``LabelsError`` for what cannot be used.
    Several files (``--labels`` repeated: rounds of labelling): their rows together, a later file's
    label winning for an id an earlier one also names (a relabelling)."""
    if not isinstance(path, (str, Path)):
        files = [read_one(p) for p in path]
        if not files:
            raise LabelsError("no labels file given")
        return files[0] if len(files) == 1 else merge(files)
    return read_one(path)


def merge(files: Sequence[LabelFile]) -> LabelFile:
    """FILES as one, in order: an id takes the label of the last file that names it."""
    import hashlib

    import pyarrow.compute as pc

    ids: list[pa.Array] = []
    labels: list[pa.Array] = []
    later: pa.Array = pa.array([], pa.string())
    for f in reversed(files):
        keep = pc.invert(pc.is_in(f.ids, value_set=later))
        ids.append(f.ids.filter(keep))
        labels.append(f.labels.filter(keep))
        later = pa.concat_arrays([later, f.ids])
    digest = hashlib.sha256("".join(f.sha256 for f in files).encode()).hexdigest()
    return LabelFile(" + ".join(f.path for f in files), pa.concat_arrays(ids[::-1]).cast(pa.string()),
                     pa.concat_arrays(labels[::-1]).cast(pa.string()), sum(f.blank for f in files),
                     sum(f.repeated for f in files), digest, sum(f.size for f in files))


def read_one(path: str | Path) -> LabelFile:
    """One labels file (``read_labels``)."""
    import pyarrow.compute as pc

    loc = storage.resolve(path)
    if not is_uri(loc) and Path(loc).is_dir():
        raise LabelsError(f"labels file {path} is a folder: give a CSV or Parquet file of id,label rows")
    try:
        table = _read_table(loc)
        names = list(table.schema.names)  # decoded here: a binary file's "header" fails here
        sha, size = _digest(loc)
    except FileNotFoundError:
        raise LabelsError(f"labels file {path} does not exist") from None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, UnicodeDecodeError) as e:
        text = str(e).strip()
        first = "".join(c if c.isprintable() else "?" for c in text.splitlines()[0][:160]) if text else \
            type(e).__name__  # a binary file's bytes are not for the terminal
        raise LabelsError(f"cannot read labels file {path} as Parquet or CSV: {first}") from None
    id_col, label_col = _columns(names)
    if id_col is None or label_col is None:
        plain = {n.strip().lower() for n in names}
        if plain & {"path", "file", "filename", "filepath", "image", "name"}:
            hint = " (labels are joined on the store's 'id' column, not on paths or file names)"
        elif id_col is None and label_col is None:
            hint = " (the first line must be a header: id,label)"
        else:
            hint = ""
        raise LabelsError(f"labels file {path} needs an 'id' and a 'label' column{hint}; it has: {_short(names)}")
    try:
        ids = table.column(id_col).cast(pa.string()).combine_chunks()
        labels = table.column(label_col).cast(pa.string()).combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise LabelsError(f"labels file {path}: its id and label columns must be text or numbers "
                          f"({str(e).strip()[:120]})") from None
    ids = pc.utf8_trim_whitespace(ids)  # "a, cat" in a hand-written CSV: the id is "a", the label "cat"
    labels = pc.utf8_trim_whitespace(labels)
    usable = pc.and_(pc.and_(pc.is_valid(ids), pc.is_valid(labels)),
                     pc.and_(pc.not_equal(labels, ""), pc.not_equal(ids, ""))).fill_null(False)
    blank = len(ids) - int(pc.sum(usable).as_py() or 0)
    ids, labels = ids.filter(usable), labels.filter(usable)
    pairs = pa.table({"id": ids, "label": labels}).group_by(["id", "label"]).aggregate([])
    repeated = len(ids) - pairs.num_rows
    if pairs.num_rows:
        per_id = pairs.group_by("id").aggregate([("label", "count")])
        twice = per_id.filter(pc.greater(per_id.column("label_count"), 1))
        if twice.num_rows:
            bad = twice.column("id")[0].as_py()
            given = sorted(pairs.filter(pc.equal(pairs.column("id"), bad)).column("label").to_pylist())
            more = f" (and {twice.num_rows - 1:,} more ids)" if twice.num_rows > 1 else ""
            raise LabelsError(f"labels file {path} gives id {bad!r} {len(given)} labels "
                              f"({', '.join(repr(g) for g in given[:4])}){more}: keep one label per id")
    return LabelFile(str(path), pairs.column("id").combine_chunks(), pairs.column("label").combine_chunks(),
                     blank, repeated, sha, size)


@dataclass(frozen=True)
class Joined:
    """What a labels file did to one store (after ``LabelJoin``'s pass)."""

    path: str
    given: int  # usable rows in the file
    used: int  # of those, ids found in the store
    unknown: int  # ids not in the store: ignored
    unknown_examples: tuple[str, ...] = ()
    overridden: int = 0  # store rows whose own label the file changed
    blank: int = 0
    sha256: str = ""  # of the file's bytes
    size: int = 0

    def summary(self, where: str = "the store") -> str:
        """One line for the CLI and the API's result; WHERE: what the ids were looked for in ("the
        images": compare and finetune, which join on the images extraction would store)."""
        s = f"labels from {self.path}: {self.used:,} of {self.given:,} used"
        if self.unknown:
            ex = ", ".join(repr(e) for e in self.unknown_examples)
            s += f"; {self.unknown:,} id{'s' if self.unknown != 1 else ''} not in {where} ignored (e.g. {ex})"
        if self.overridden:
            own = "the store's own labels" if where == "the store" else "their folders' labels"
            s += f"; {self.overridden:,} of {own} replaced"
        if self.blank:
            s += f"; {self.blank:,} row{'s' if self.blank != 1 else ''} without a label skipped"
        return s

    def to_dict(self) -> dict[str, object]:
        return {"path": self.path, "given": self.given, "used": self.used, "unknown": self.unknown,
                "unknown_examples": list(self.unknown_examples), "overridden": self.overridden,
                "blank": self.blank, "sha256": self.sha256, "bytes": self.size}


@dataclass
class LabelJoin:
    """Put FILE's labels over a store's, batch by batch (module docstring). Apply it to every row of
    the store exactly once before ``result()``; a second pass over the same rows counts nothing
    new (``used`` counts distinct file rows)."""

    file: LabelFile
    _found: np.ndarray = field(init=False)
    _overridden: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._found = np.zeros(len(self.file), bool)

    def apply(self, ids: pa.Array | pa.ChunkedArray, labels: pa.Array | pa.ChunkedArray | None = None,
              count: bool = True) -> pa.StringArray:
        """The labels of the rows with these IDS: the file's where it has the id, else LABELS (the
        store's, cast to text; None: the store has none). COUNT: record what was used."""
        import pyarrow.compute as pc

        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        ids = ids.cast(pa.string())
        at = pc.index_in(ids, value_set=self.file.ids)
        mine = self.file.labels.take(at)  # null where the file has no such id
        if labels is None:
            own: pa.Array = pa.nulls(len(ids), pa.string())
        else:
            own = (labels.combine_chunks() if isinstance(labels, pa.ChunkedArray) else labels).cast(pa.string())
        out = pc.if_else(pc.is_valid(at), mine, own)
        if count and len(ids):
            hit = at.drop_null().to_numpy(zero_copy_only=False)
            self._found[hit] = True
            if labels is not None:
                changed = pc.and_(pc.and_(pc.is_valid(at), pc.is_valid(own)),
                                  pc.and_(pc.not_equal(own, ""), pc.not_equal(own, mine)))
                self._overridden += int(pc.sum(changed.fill_null(False)).as_py() or 0)
        return out

    def result(self) -> Joined:
        missing = np.flatnonzero(~self._found)
        examples = tuple(str(self.file.ids[int(i)].as_py()) for i in missing[:EXAMPLES])
        return Joined(self.file.path, len(self.file), int(self._found.sum()), len(missing), examples,
                      self._overridden, self.file.blank, self.file.sha256, self.file.size)

    def require_some(self, store: str) -> Joined:
        """``result()``, refusing a file none of whose ids is in STORE."""
        r = self.result()
        if r.given and not r.used:
            ex = ", ".join(repr(e) for e in r.unknown_examples)
            raise LabelsError(f"none of the {r.given:,} ids in {r.path} is in {store} (e.g. {ex}): labels are "
                              "joined on the store's 'id' column (see `embedder info`, or the ids "
                              "`embedder select` wrote)")
        if not r.given:
            raise LabelsError(f"labels file {r.path} has no rows with both an id and a label")
        return r
