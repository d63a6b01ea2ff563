from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedder.errors import SourceError
from embedder.io.sources import discover
from embedder.io.uri import image_id
from tests.conftest import make_images


def test_folder_labels_follow_imagefolder(tmp_path: Path) -> None:
    make_images(tmp_path / "root", {"a": 2, "b": 3})
    make_images(tmp_path / "root", {"": 1})  # an image directly in the root: no label
    (tmp_path / "root" / "a" / "deep").mkdir()
    make_images(tmp_path / "root" / "a" / "deep", {"": 1})
    (tmp_path / "root" / "notes.txt").write_text("x")
    (tmp_path / "root" / ".hidden.jpg").write_bytes(b"x")
    refs = discover([tmp_path / "root"])
    labels = sorted((r.label or "-") for r in refs)
    assert labels == ["-", "a", "a", "a", "b", "b", "b"]
    assert all(Path(r.path).is_absolute() for r in refs)


def test_ids_are_stable_and_deduplicated(tmp_path: Path) -> None:
    make_images(tmp_path, {"x": 3})
    first = discover([tmp_path, tmp_path / "x"])
    assert len(first) == 3
    assert [r.id for r in first] == [r.id for r in discover([tmp_path])]
    assert first[0].id == image_id(first[0].path)


def test_glob_and_lists(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "imgs", {"c1": 2, "c2": 2})
    assert len(discover([str(tmp_path / "imgs" / "**" / "*.jpg")])) == 4
    assert {r.label for r in discover([str(tmp_path / "imgs" / "*" / "*.jpg")])} == {"c1", "c2"}
    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for p in paths:
            w.writerow([p.relative_to(tmp_path), "L-" + p.parent.name])
    refs = discover([tmp_path / "list.csv"])
    assert len(refs) == 4 and {r.label for r in refs} == {"L-c1", "L-c2"}
    (tmp_path / "list.txt").write_text("\n".join(str(p) for p in paths[:3]) + "\n")
    assert len(discover([tmp_path / "list.txt"])) == 3
    pq.write_table(pa.table({"path": [str(p) for p in paths[:2]], "label": ["u", "v"]}),
                   tmp_path / "list.parquet")
    assert [r.label for r in discover([tmp_path / "list.parquet"])] == ["u", "v"]


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        discover([tmp_path / "nope"])
    with pytest.raises(SourceError, match="matched no images"):
        discover([str(tmp_path / "*.jpg")])
    (tmp_path / "data.bin").write_bytes(b"1")
    with pytest.raises(SourceError, match="neither an image"):
        discover([tmp_path / "data.bin"])
    with pytest.raises(SourceError, match="no SOURCE"):
        discover([])


def test_empty_folder_and_symlink_cycle(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images found"):
        discover([tmp_path / "empty"])
    make_images(tmp_path / "loop" / "a", {"": 2})
    (tmp_path / "loop" / "a" / "back").symlink_to(tmp_path / "loop")
    assert len(discover([tmp_path / "loop"])) == 2


def test_upper_case_list_files(tmp_path: Path) -> None:
    """LIST.CSV / PATHS.TXT / LIST.TSV are lists too (the suffix was compared case-sensitively)."""
    paths = make_images(tmp_path / "imgs", {"c1": 2, "c2": 1})
    with open(tmp_path / "LIST.CSV", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for p in paths:
            w.writerow([p, "L-" + p.parent.name])
    refs = discover([tmp_path / "LIST.CSV"])
    assert len(refs) == 3 and {r.label for r in refs} == {"L-c1", "L-c2"}
    (tmp_path / "LIST.TSV").write_text("path\tlabel\n" + "".join(f"{p}\tx\n" for p in paths))
    assert {r.label for r in discover([tmp_path / "LIST.TSV"])} == {"x"}
    (tmp_path / "PATHS.TXT").write_text("\n".join(str(p) for p in paths[:2]) + "\n")
    assert [r.path for r in discover([tmp_path / "PATHS.TXT"])] == [str(p) for p in paths[:2]]


@pytest.mark.parametrize("p", ["a/b.jpg", "./a//b/./c.jpg", "/x/../y.jpg", "//net/share/a.jpg", "///a//b.jpg",
                               "/", "a/", "../up.jpg", ".", "é/ü.png", "/a/./././b", "/a/b/../../c/..jpg"])
def test_absolute_is_the_path_the_id_hashes(p: str) -> None:
    """Discovery builds paths without pathlib (a Path object per image, and its interning of every
    name, cost 2.3x the time on a 1M-line list): the string ``image_id`` hashes (``os.path.abspath``),
    so the stored path is the id's; '..' no longer kept in stored paths."""
    import os

    from embedder.io.sources import _absolute

    assert _absolute(p) == os.path.abspath(p) and "/../" not in _absolute(p)


def test_stored_paths_hold_no_dot_dot(image_tree: Path, tmp_path: Path) -> None:
    from embedder.io.sources import discover

    refs = list(discover([image_tree / "cat" / ".." / "dog"]))
    assert refs and all(".." not in r.path.split("/") for r in refs)
    assert {r.id for r in refs} == {r.id for r in discover([image_tree / "dog"])}
