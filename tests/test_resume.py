"""A real crash: kill -9 a running extraction, rerun the same command, every image exactly once."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from embedder.io.sources import discover
from embedder.store.shards import Store
from tests.conftest import extract_killed_mid_run, make_images


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    make_images(src, {"a": 150, "b": 150}, size=(96, 96))
    store = tmp_path / "store"
    # The real CLI in a real process, slowed a little per batch so the kill lands mid-run.
    cmd = extract_killed_mid_run(str(src), store)
    partial = Store.open(store).count()
    assert 0 < partial < 300, partial
    # Wherever the kill landed, a temporary it left is removed once the next writer holds the lock.
    (store / ".part-99999-dead.parquet.tmp").write_bytes(b"half a shard")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ids = Store.open(store).read(["id"]).column("id").to_pylist()
    assert len(ids) == 300 and len(set(ids)) == 300
    assert set(ids) == {r.id for r in discover([src])}
    assert not list(store.glob(".*tmp"))


def test_the_manifest_lists_every_shard_and_is_reconciled_after_a_crash(tmp_path: Path) -> None:
    """Flushes append their shard to the manifest (no footer re-reads); a writer killed between a
    shard and its manifest update, or a shard moved away, is reconciled when the next writer opens."""
    import json

    from embedder.embed.fill import extract
    from embedder.embed.options import EmbedOptions, RunOptions
    from embedder.models.builder import ModelSpec

    src = tmp_path / "imgs"
    make_images(src, {"a": 15, "b": 15}, size=(40, 40))
    store_dir = tmp_path / "store"
    spec = ModelSpec("tiny_test")
    extract([str(src)], str(store_dir), spec, EmbedOptions(), RunOptions(batch_size=4, shard_rows=4))

    def listed() -> dict[str, int]:
        return {s["file"]: s["rows"] for s in json.loads((store_dir / "_manifest.json").read_text())["shards"]}

    def on_disk() -> dict[str, int]:
        import pyarrow.parquet as pq

        return {Path(p).name: pq.ParquetFile(p).metadata.num_rows for p in Store.open(store_dir).shard_files()}

    assert listed() == on_disk() and sum(listed().values()) == 30 and len(listed()) == 8
    store = Store.open(store_dir)
    extra = store.read().slice(0, 3)
    first = sorted(listed())[0]
    with Store.writer(store_dir, store.provenance) as w:
        written = Path(w.write_shard(extra))  # ... and the writer dies before updating the manifest
    (store_dir / first).unlink()  # a shard moved away by hand
    assert written.name not in listed() and first in listed()
    with Store.writer(store_dir, store.provenance):
        pass
    assert listed() == on_disk() and written.name in listed() and first not in listed()


def test_a_long_runs_manifest_is_rewritten_at_most_every_few_seconds_and_completed_on_close(
        tmp_path: Path) -> None:
    import json

    from embedder.embed.fill import extract
    from embedder.embed.options import EmbedOptions, RunOptions
    from embedder.models.builder import ModelSpec

    src = tmp_path / "imgs"
    make_images(src, {"a": 4}, size=(40, 40))
    store_dir = tmp_path / "store"
    extract([str(src)], str(store_dir), ModelSpec("tiny_test"), EmbedOptions(), RunOptions(batch_size=4))
    prov = Store.open(store_dir).provenance
    extra = Store.open(store_dir).read().slice(0, 1)

    def listed() -> list[str]:
        return [s["file"] for s in json.loads((store_dir / "_manifest.json").read_text())["shards"]]

    with Store.writer(store_dir, prov) as w:
        names = []
        for i in range(3):
            names.append(Path(w.write_shard(extra)).name)
            w.update_manifest({"run_id": "r", "done": i + 1}, [(names[-1], 1)])
        assert names[0] in listed() and not set(names[1:]) & set(listed())  # the first at once, then held
        w.update_manifest(None, [], now=True)
        assert set(names) <= set(listed())
        names.append(Path(w.write_shard(extra)).name)
        w.update_manifest({"run_id": "r", "done": 4}, [(names[-1], 1)])
        assert names[-1] not in listed()
    assert names[-1] in listed()  # closing the writer saves what was held back
    runs = json.loads((store_dir / "_manifest.json").read_text())["runs"]
    assert runs[-1] == {"run_id": "r", "done": 4}
