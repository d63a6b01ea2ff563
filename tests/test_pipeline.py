"""The decode seam and the pipeline around it: decode processes against threads, the reused ring,
the stage report, the GPU decoder's chunk logic (run on CPU tensors here), and the GPU benchmark's
smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from embedder.cli import app
from embedder.decode.decoders import decode_file
from embedder.decode.nvjpeg import decode_chunk, encode_header, orient
from embedder.decode.pool import resolve_decode_in
from embedder.embed.batch import BatchEmbedder
from embedder.embed.fill import extract
from embedder.embed.options import EmbedOptions, RunOptions
from embedder.errors import EmbedderError
from embedder.models.builder import ModelSpec
from embedder.models.registry import get_backbone
from embedder.store.shards import Store
from tests.conftest import make_images

TINY = ModelSpec("tiny_test")
ROOT = Path(__file__).parent.parent


def _vectors(store: str) -> tuple[list[str], np.ndarray]:
    t = Store.open(store).read(["id", "embedding"]).sort_by("id")
    return t.column("id").to_pylist(), np.stack(t.column("embedding").to_numpy(zero_copy_only=False))


def test_decode_processes_give_the_same_store_as_threads(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    make_images(src, {"a": 13, "b": 12}, size=(64, 48))
    (src / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    stores = {}
    for kind in ("threads", "processes"):
        stores[kind] = str(tmp_path / kind)
        s = extract([str(src)], stores[kind], TINY, EmbedOptions(),
                    RunOptions(batch_size=4, decode_in=kind, workers=2))
        assert (s.done, s.failed) == (25, 1)
        assert [p for p, _ in s.failures] == [str(src / "a" / "broken.jpg")]
    ids_t, vec_t = _vectors(stores["threads"])
    ids_p, vec_p = _vectors(stores["processes"])
    assert ids_t == ids_p
    np.testing.assert_array_equal(vec_t, vec_p)


def test_the_batch_ring_is_reused_not_reallocated(tmp_path: Path) -> None:
    """Every batch reaches the model from one of the ring's fixed buffers (no per-batch tensors)."""
    src = tmp_path / "imgs"
    make_images(src, {"a": 20, "b": 20}, size=(40, 40))
    emb = BatchEmbedder(TINY)
    seen: list[int] = []
    launch = emb.launch

    def recording(pixels: torch.Tensor) -> object:
        seen.append(pixels.data_ptr())
        return launch(pixels)

    emb.launch = recording  # type: ignore[method-assign]
    run = RunOptions(batch_size=4, prefetch_batches=2, decode_in="threads", workers=2)
    extract([str(src)], str(tmp_path / "s"), TINY, EmbedOptions(), run, embedder=emb)
    assert len(seen) == 10
    assert len(set(seen)) <= 3  # prefetch_batches + 1 slots, whatever the number of batches


def test_the_stage_report_names_what_bounds_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "imgs"
    make_images(src, {"a": 12}, size=(40, 40))
    from embedder.decode import pool as dp

    decode = dp.decode_into

    def slow_decode(*a: object, **k: object) -> object:
        time.sleep(0.05)
        return decode(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(dp, "decode_into", slow_decode)
    s = extract([str(src)], str(tmp_path / "d"), TINY, EmbedOptions(),
                RunOptions(batch_size=4, decode_in="threads", workers=1))
    assert s.stages["bound_by"] == "decode" and s.stages["decode_wait_s"] > 0.3
    monkeypatch.setattr(dp, "decode_into", decode)

    emb = BatchEmbedder(TINY)
    model = emb.model

    class Slow(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            time.sleep(0.1)
            return model(x)  # type: ignore[no-any-return]

    emb.model = Slow()  # type: ignore[assignment]
    s = extract([str(src)], str(tmp_path / "m"), TINY, EmbedOptions(),
                RunOptions(batch_size=4, decode_in="threads", workers=1), embedder=emb)
    assert s.stages["bound_by"] == "model" and s.stages["model_s"] >= 0.3
    assert 0 < s.stages["model_utilisation"] <= 1


class _Concurrency(torch.nn.Module):
    """The model, counting how many batches it computes at once."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.now, self.most = model, 0, 0
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.03)  # long enough for the next batch to be launched meanwhile
        try:
            return self.model(x)  # type: ignore[no-any-return]
        finally:
            with self.lock:
                self.now -= 1


def test_cpu_lanes_compute_batches_at_once_and_keep_the_order(tmp_path: Path) -> None:
    """Two lanes must really overlap (a lane that waited for the other would be one lane), and the
    rows must come out in discovery order with the same vectors as one lane, failures included."""
    src = tmp_path / "imgs"
    make_images(src, {"a": 17, "b": 14}, size=(48, 40))
    (src / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    stores = {}
    for lanes in (1, 3):
        emb = BatchEmbedder(TINY)
        watched = _Concurrency(emb.model)
        emb.model = watched  # type: ignore[assignment]
        stores[lanes] = str(tmp_path / f"lanes{lanes}")
        s = extract([str(src)], stores[lanes], TINY, EmbedOptions(),
                    RunOptions(batch_size=4, workers=2, model_lanes=lanes, shard_rows=8), embedder=emb)
        assert (s.done, s.failed) == (31, 1)
        assert s.stages["lanes"] == lanes and 0 < s.stages["model_utilisation"] <= 1
        assert watched.most == lanes
    rows = {k: Store.open(v).read(["id", "embedding"]) for k, v in stores.items()}
    assert rows[1].column("id").to_pylist() == rows[3].column("id").to_pylist()  # shard by shard, row by row
    np.testing.assert_allclose(np.stack(rows[1].column("embedding").to_numpy(zero_copy_only=False)),
                               np.stack(rows[3].column("embedding").to_numpy(zero_copy_only=False)), atol=1e-5)


def test_lanes_decode_their_own_batches_and_give_the_same_store(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``--decode-in lanes``: every image is decoded on a model-lane thread (no decode workers), that
    thread then computes the batch, and the store is the one decode threads give: the same rows in
    the same order, the same vectors, the same skipped image; a batch that fails whole is recorded."""
    src = tmp_path / "imgs"
    make_images(src, {"a": 17, "b": 14}, size=(48, 40))
    (src / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    from embedder.decode import pool as dp

    decode = dp.decode_into
    decoded_on: list[str] = []

    def recording(*a: object, **k: object) -> object:
        decoded_on.append(threading.current_thread().name)
        return decode(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(dp, "decode_into", recording)
    stores, computed_on = {}, {}
    for kind in ("threads", "lanes"):
        decoded_on.clear()
        emb = BatchEmbedder(TINY)
        model = emb.model
        seen: list[str] = []

        def forward(x: torch.Tensor, model: torch.nn.Module = model, seen: list[str] = seen) -> torch.Tensor:
            seen.append(threading.current_thread().name)
            return model(x)  # type: ignore[no-any-return]

        emb.model = forward  # type: ignore[assignment]
        stores[kind] = str(tmp_path / kind)
        s = extract([str(src)], stores[kind], TINY, EmbedOptions(),
                    RunOptions(batch_size=4, workers=2, decode_in=kind, model_lanes=2, shard_rows=8), embedder=emb)
        assert (s.done, s.failed) == (31, 1)
        assert [p for p, _ in s.failures] == [str(src / "a" / "broken.jpg")]
        assert len(decoded_on) == 32
        prefix = "model-lane" if kind == "lanes" else "decode"
        assert {n.split("_")[0] for n in decoded_on} == {prefix}, (kind, set(decoded_on))
        computed_on[kind] = set(seen)
        if kind == "lanes":
            assert s.stages["decode_s"] > 0 and s.stages["decode_wait_s"] == 0
    assert {n.split("_")[0] for n in computed_on["lanes"]} == {"model-lane"}
    rows = {k: Store.open(v).read(["id", "embedding"]) for k, v in stores.items()}
    assert rows["threads"].column("id").to_pylist() == rows["lanes"].column("id").to_pylist()
    np.testing.assert_array_equal(np.stack(rows["threads"].column("embedding").to_numpy(zero_copy_only=False)),
                                  np.stack(rows["lanes"].column("embedding").to_numpy(zero_copy_only=False)))

    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(5):  # a first batch of 4 that fails whole, then one good image
        (bad / f"{i}.jpg").write_bytes(b"not an image")
    make_images(bad / "z", {"ok": 1}, size=(48, 40))
    s = extract([str(bad)], str(tmp_path / "bad-store"), TINY, EmbedOptions(),
                RunOptions(batch_size=4, decode_in="lanes", model_lanes=2))
    assert (s.done, s.failed) == (1, 5)
    assert len(Store.open(str(tmp_path / "bad-store")).failed_ids()) == 5


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_idle_decode_workers_run_under_sched_idle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--decode-priority idle``: decode threads and processes run under SCHED_IDLE (only on cores
    nothing else wants); by default they keep the normal policy, and the caller is never lowered."""
    src = tmp_path / "imgs"
    make_images(src, {"a": 8}, size=(40, 40))
    from embedder.decode import pool as dp

    decode = dp.decode_into
    policies: set[int] = set()

    def recording(*a: object, **k: object) -> object:
        policies.add(os.sched_getscheduler(0))  # the calling thread's own policy
        return decode(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(dp, "decode_into", recording)
    for priority, expected in (("normal", os.SCHED_OTHER), ("idle", os.SCHED_IDLE)):
        policies.clear()
        extract([str(src)], str(tmp_path / priority), TINY, EmbedOptions(),
                RunOptions(batch_size=4, decode_in="threads", workers=2, decode_priority=priority))
        assert policies == {expected}, priority
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's thread is never lowered

    # decode processes are lowered too (asked in the workers, after their initializer)
    pre = get_backbone("tiny_test").preprocessing()
    ring = dp.Ring(2, 4, pre.crop_size, shared=True, pin=False)
    with dp.DecodeWorkers(ring, dp.DecodeSpec(pre), "processes", 2, "idle") as pool:
        for fut in pool.submit(0, [str(p) for p in sorted(src.rglob("*.jpg"))[:4]]):
            assert not isinstance(fut.result()[0], str)
        seen = {f.result() for f in [pool._pool.submit(os.sched_getscheduler, 0) for _ in range(6)]}
        assert seen == {os.SCHED_IDLE}


def test_decode_in_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(EmbedderError, match="valid: auto, threads, processes, lanes"):
        resolve_decode_in("fork", cpu, 4, 1)
    assert resolve_decode_in("auto", cpu, 15, 1) == "threads"  # no lanes
    assert resolve_decode_in("auto", cpu, 1, 1, lane_threads=1) == "lanes"  # one thread per lane
    assert resolve_decode_in("auto", cpu, 15, 1, lane_threads=8) == "threads"  # a lane's threads would wait
    assert resolve_decode_in("lanes", cpu, 15, 1, lane_threads=8) == "lanes"  # asked for
    with pytest.raises(EmbedderError, match="needs a CPU device, --model-lanes 2 or more"):
        resolve_decode_in("lanes", cpu, 1, 1)
    assert resolve_decode_in("auto", cuda, 15, 1) == "processes"
    assert resolve_decode_in("processes", cuda, 15, 1, decoder="nvjpeg") == "threads"
    from embedder.decode import pool as dp

    monkeypatch.setattr(dp, "shm_free_bytes", lambda: 64 << 20)  # a container's default /dev/shm
    assert resolve_decode_in("processes", cuda, 15, 96 << 20) == "threads"


def test_nvjpeg_without_a_gpu_is_a_one_line_error(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    make_images(src, {"a": 2})
    r = CliRunner().invoke(app, ["extract", str(src), "--out", str(tmp_path / "s"), "--backbone", "tiny_test",
                                 "--decoder", "nvjpeg", "--device", "cpu"])
    assert r.exit_code != 0
    assert r.output.strip().count("\n") == 0 and "needs a CUDA device" in r.output
    assert not (tmp_path / "s").exists()


def _oriented_jpeg(path: Path, orientation: int) -> None:
    rng = np.random.default_rng(orientation)
    arr = np.zeros((90, 150, 3), np.uint8)
    arr[:30, :50] = 255  # a corner marker: any wrong flip or rotation moves it
    arr += rng.integers(0, 40, arr.shape, dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, "JPEG", quality=92, exif=exif)


def test_gpu_decoder_chunk_logic_matches_the_torchvision_decoder(tmp_path: Path) -> None:
    """decode_chunk is what nvjpeg decode threads run; on CPU tensors it runs libjpeg instead of
    nvJPEG, so its orientation, grouping, resize, crop and fallbacks must reproduce the torchvision
    decoder (JPEG) and the pil decoder (others) exactly."""
    pre = get_backbone("tiny_test").preprocessing()
    paths = []
    for k in range(1, 9):
        p = tmp_path / f"o{k}.jpg"
        _oriented_jpeg(p, k)
        paths.append(p)
    png = tmp_path / "x.png"
    Image.fromarray(np.full((50, 70, 3), 77, np.uint8)).save(png)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (60, 40), (10, 200, 30, 0)).save(cmyk, "JPEG")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    paths += [png, cmyk, bad]
    n = len(paths) + 2
    host = torch.zeros((n, 3, pre.crop_size, pre.crop_size), dtype=torch.uint8)
    target = torch.zeros_like(host)
    outcomes = decode_chunk([str(p) for p in paths], 2, host, target, None, pre)
    assert isinstance(outcomes[-1], str) and outcomes[-1]
    for i, p in enumerate(paths[:-1]):
        reference = decode_file(str(p), pre, decoder="torchvision")
        meta = outcomes[i]
        assert not isinstance(meta, str), (p, meta)
        assert (meta.width, meta.height) == (reference.width, reference.height), p
        assert torch.equal(target[2 + i], reference.pixels), p


def test_orientation_matches_pil_exif_transpose() -> None:
    from PIL import ImageOps

    arr = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    for k in range(1, 9):
        img = Image.fromarray(arr)
        exif = img.getexif()
        exif[0x0112] = k
        img.info["exif"] = exif.tobytes()
        expected = np.asarray(ImageOps.exif_transpose(img))
        got = orient(torch.from_numpy(arr).permute(2, 0, 1), k).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, expected, err_msg=f"orientation {k}")


def test_gpu_header_checks_refuse_bombs_and_hand_odd_files_to_the_cpu(tmp_path: Path) -> None:
    pre = get_backbone("tiny_test").preprocessing()
    p = tmp_path / "big.jpg"
    Image.new("RGB", (300, 200)).save(p)
    data = p.read_bytes()
    with pytest.raises(EmbedderError, match="decompression bomb"):
        encode_header(data, pre, max_pixels=300 * 200 - 1)
    enc = encode_header(data, pre, max_pixels=10**8)
    assert enc is not None and (enc.meta.width, enc.meta.height) == (300, 200)
    assert encode_header(b"\x89PNG\r\n\x1a\n", pre, 10**8) is None


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "bench_gpu.sh"), "--smoke",
                        "--only", "model,extract,probe,faiss", "--out", str(out)],
                       capture_output=True, text=True, timeout=300,
                       env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert not [row for row in rows if "error" in row], rows
    sections = [row["section"] for row in rows]
    assert sections.count("model_only") == 2 and sections.count("extract") == 4 and sections.count("probe") == 3
    # faiss-cpu here: the raw IVF row and embedder's training row, both on the CPU
    assert [(row["section"], row["where"]) for row in rows if row["section"].startswith("faiss")] == \
        [("faiss", "cpu"), ("faiss_train", "cpu")]
    assert all(row["img_s"] > 0 for row in rows if "img_s" in row)
    assert all(row["images"] == 48 for row in rows if row["section"] == "extract")
    assert "| end to end |" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--decode-in", "fork"], "Invalid value for '--decode-in': 'fork' is not one of 'auto', 'threads', "
                              "'processes', 'lanes'"),  # refused when the command line is parsed
    (["--decode-in", "lanes", "--model-lanes", "1"], "--decode-in lanes decodes inside the CPU model lanes"),
    (["--engine", "spark"], "'spark' is not one of 'local', 'ray'"),
    (["--engine", "ray", "--address", "nohost"], "expected auto, HOST:PORT or ray://HOST:PORT"),
    (["--decode-priority", "high"], "'high' is not one of 'normal', 'idle'"),
    (["--model-lanes", "0"], "--model-lanes must be at least 1, got 0"),
], ids=["decode-in", "decode-in-lanes", "engine", "address", "decode-priority", "model-lanes"])
def test_bad_pipeline_options_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    src = tmp_path / "imgs"
    make_images(src, {"a": 2})
    r = CliRunner().invoke(app, ["extract", str(src), "--out", str(tmp_path / "s"), "--backbone", "tiny_test", *args])
    assert r.exit_code == 2, r.output
    assert r.output.strip().count("\n") == 0 and message in r.output
    assert not (tmp_path / "s").exists()
