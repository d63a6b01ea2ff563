"""The Ray engine against a real local Ray cluster (`ray start --head`, 2 CPUs, started once for
this module): the same store as the local engine, resume, a worker and the driver killed with
SIGKILL mid-run, and the one-line errors. Every test runs under a time limit."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from embedder.cli import app
from embedder.embed.fill import extract
from embedder.embed.options import EmbedOptions, RunOptions
from embedder.errors import RayError
from embedder.io.sources import discover
from embedder.models.builder import ModelSpec
from embedder.store.shards import Store
from tests.conftest import make_images, slowed_cli

ray = pytest.importorskip("ray")

TINY = ModelSpec("tiny_test")
RAY_CLI = str(Path(sys.executable).parent / "ray")
EMBEDDER_CLI = [sys.executable, "-m", "embedder"]
LIMIT_S = 240  # per test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    # A throwaway cluster on 127.0.0.1: Ray's token authentication is left off for it (the head and
    # every client of these tests must agree on it, subprocesses included, through the environment).
    import os

    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        yield from _cluster()
    finally:
        if previous is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous


def _cluster() -> Iterator[str]:
    port = _free_port()
    head = subprocess.Popen([RAY_CLI, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats", "--node-ip-address=127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        head.kill()
        pytest.fail("ray start --head did not come up in 90 s")
    time.sleep(2)
    try:
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        head.send_signal(signal.SIGTERM)  # --block: the head tears its cluster down on SIGTERM
        try:  # ... in about 30 s, waiting on its workers: a throwaway cluster's group is killed after 5
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            import os

            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)  # reaped: no "subprocess still running" at exit


@pytest.fixture(autouse=True)
def time_limit() -> Iterator[None]:
    def expired(*_: object) -> None:
        raise TimeoutError(f"Ray test exceeded {LIMIT_S} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _store_vectors(path: Path) -> tuple[list[str], np.ndarray]:
    t = Store.open(str(path)).read(["id", "embedding"]).sort_by("id")
    return t.column("id").to_pylist(), np.stack(t.column("embedding").to_numpy(zero_copy_only=False))


@pytest.mark.slow
def test_ray_engine_writes_the_local_engines_store_and_resumes(tmp_path: Path, cluster: str) -> None:
    from embedder.embed.options import RayOptions
    from embedder.embed.ray import extract_ray

    src = tmp_path / "imgs"
    make_images(src, {"a": 14, "b": 13}, size=(64, 48))
    (src / "a" / "broken.jpg").write_bytes(b"not a jpeg at all")
    opts = RayOptions(address=cluster, workers=1)
    s = extract_ray([str(src)], str(tmp_path / "ray"), TINY, EmbedOptions(), RunOptions(batch_size=4), opts)
    assert (s.done, s.failed) == (27, 1)
    assert not list((tmp_path / "ray" / ".staging").iterdir())  # workers staged, the driver committed all
    from embedder.store import id_index

    assert all(Path(id_index.path_for(f)).is_file() for f in Store.open(str(tmp_path / "ray")).shard_files())
    local = extract([str(src)], str(tmp_path / "local"), TINY, EmbedOptions(), RunOptions(batch_size=4))
    assert (local.done, local.failed) == (27, 1)
    ids_r, vec_r = _store_vectors(tmp_path / "ray")
    ids_l, vec_l = _store_vectors(tmp_path / "local")
    assert ids_r == ids_l
    np.testing.assert_allclose(vec_r, vec_l, atol=1e-5)
    ray_store, local_store = Store.open(str(tmp_path / "ray")), Store.open(str(tmp_path / "local"))
    assert ray_store.failed_ids() == local_store.failed_ids() and len(ray_store.failed_ids()) == 1
    a, b = ray_store.provenance, local_store.provenance
    assert (a.backbone, a.weights, a.preprocessing, a.decoder, a.precision, a.dim) == \
        (b.backbone, b.weights, b.preprocessing, b.decoder, b.precision, b.dim)
    # resume: nothing new is scheduled, the failure is not retried
    again = extract_ray([str(src)], str(tmp_path / "ray"), TINY, EmbedOptions(), RunOptions(batch_size=4), opts)
    assert (again.done, again.skipped_present, again.skipped_failed_before) == (0, 27, 1)
    # new images only, embedded by actors on the oneDNN graph: the local engine's vectors still
    make_images(src / "c", {"": 3}, size=(64, 48), seed=5)
    more = extract_ray([str(src)], str(tmp_path / "ray"), TINY, EmbedOptions(cpu_graph="onednn"),
                       RunOptions(batch_size=4), opts)
    assert (more.done, more.skipped_present) == (3, 27)
    assert Store.open(str(tmp_path / "ray")).count() == 30
    assert Store.open(str(tmp_path / "ray")).manifest()["runs"][-1]["cpu_graph"] == "onednn"
    extract([str(src)], str(tmp_path / "local"), TINY, EmbedOptions(), RunOptions(batch_size=4))
    ids_r, vec_r = _store_vectors(tmp_path / "ray")
    ids_l, vec_l = _store_vectors(tmp_path / "local")
    assert ids_r == ids_l and len(ids_r) == 30
    np.testing.assert_allclose(vec_r, vec_l, atol=1e-5)


def _cli(src: Path, store: Path, address: str) -> list[str]:
    return [*EMBEDDER_CLI, "extract", str(src), "--out", str(store), "--backbone", "tiny_test", "--engine", "ray",
            "--address", address, "--actors", "1", "--batch-size", "2", "--shard-rows", "4"]


def _wait_for_shards(store: Path, n: int, proc: subprocess.Popen[bytes], limit: float = 120) -> None:
    def count() -> int:
        return len(list(store.glob("part-*.parquet")))

    deadline = time.time() + limit
    while time.time() < deadline and count() < n:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {n} shards were written")
        time.sleep(0.05)
    if count() < n:
        pytest.fail(f"fewer than {n} shards after {limit:.0f} s")


def _exactly_once(src: Path, store: Path) -> None:
    ids = Store.open(str(store)).read(["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an image was written twice"
    assert set(ids) == {r.id for r in discover([str(src)])}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["files", "tar shards"])
def test_a_worker_killed_mid_run_is_restarted_and_nothing_is_lost_or_doubled(tmp_path: Path, cluster: str,
                                                                             kind: str) -> None:
    import json
    import os

    from tests import ray_hooks

    src = tmp_path / "imgs"
    files = make_images(src, {"a": 300, "b": 300}, size=(64, 48))  # 300 batches of 2 for the model actor
    if kind == "tar shards":  # the same images in 3 shards: the retried task re-reads members by offset
        from tests.test_shards_tables import write_shards

        write_shards(tmp_path / "shards", sorted(files), per_shard=200)
        src = tmp_path / "shards" / "*.tar"
    store = tmp_path / "store"
    log = tmp_path / "batches.log"
    # The real CLI, its model actor slowed and counted by a Ray worker set-up hook given to the job
    # through Ray's job config (what `ray job submit --runtime-env-json` does): the actor holds still
    # in its 150th batch of 300 and is killed there, not at a moment guessed from outside.
    job = {"runtime_env": {"worker_process_setup_hook": "tests.ray_hooks.slow_embedding",
                           "env_vars": {"PYTHONPATH": str(Path(__file__).parent.parent),
                                        ray_hooks.BATCH_LOG: str(log)}}}
    env = dict(os.environ, RAY_JOB_CONFIG_JSON_ENV_VAR=json.dumps(job))
    proc = subprocess.Popen(_cli(src, store, cluster), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 120
        while (not log.exists() or log.stat().st_size < ray_hooks.HOLD_AT) and time.time() < deadline \
                and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None and log.exists() and log.stat().st_size == ray_hooks.HOLD_AT, \
            "the actor never got half-way"
        pids = subprocess.run(["pgrep", "-f", r"MapWorker\(MapBatches\(_Embed"], capture_output=True,
                              text=True).stdout.split()
        assert pids, "no model actor process found"
        killed_at = log.stat().st_size
        for pid in pids:
            subprocess.run(["kill", "-9", pid])
        _, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:  # a failed assertion must not leave the run behind for the next test
            proc.kill()
        if proc.stderr is not None and not proc.stderr.closed:
            proc.communicate()  # reaps it and closes its stderr pipe
    assert proc.returncode == 0, err.decode()[-2000:]
    assert killed_at == ray_hooks.HOLD_AT
    # the actor died inside a batch: Ray re-ran that batch's task (at least that batch) in a new actor
    assert log.stat().st_size > 300, log.stat().st_size
    _exactly_once(src, store)


@pytest.mark.slow
def test_a_killed_driver_resumes_on_the_next_run(tmp_path: Path, cluster: str) -> None:
    src = tmp_path / "imgs"
    make_images(src, {"a": 200, "b": 200}, size=(64, 48))
    store = tmp_path / "store"
    # the real CLI, its commits slowed a little so that the kill lands mid-run (workers stage
    # shards faster than a 2-core machine lets the driver be scheduled)
    slow = slowed_cli("embedder.store.shards", "Store", "commit_shard", 0.05)
    proc = subprocess.Popen([*slow, *_cli(src, store, cluster)[3:]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for_shards(store, 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = Store.open(str(store)).count()
    assert 0 < partial < 400, partial
    (store / ".staging").mkdir(exist_ok=True)
    (store / ".staging" / "0123456789abcdef.parquet").write_bytes(b"staged by a killed run, never committed")
    done = subprocess.run(_cli(src, store, cluster), capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-2000:]
    _exactly_once(src, store)
    assert not list(store.glob(".*tmp"))
    assert not list((store / ".staging").iterdir())  # orphans swept, every staged shard committed


def test_without_ray_installed_the_error_names_the_fix(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    make_images(src, {"a": 2})
    shim = "import sys; sys.modules['ray'] = None; from embedder.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", shim, "extract", str(src), "--out", str(tmp_path / "s"),
                        "--backbone", "tiny_test", "--engine", "ray"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "pip install 'embedder[ray]'" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "s").exists()


def test_an_unreachable_cluster_is_a_one_line_error(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    make_images(src, {"a": 2})
    port = _free_port()  # nothing listens there
    t0 = time.time()
    r = CliRunner().invoke(app, ["extract", str(src), "--out", str(tmp_path / "s"), "--backbone", "tiny_test",
                                 "--engine", "ray", "--address", f"127.0.0.1:{port}"])
    assert r.exit_code == RayError.exit_code
    assert r.output.strip().count("\n") == 0 and "cannot reach the Ray cluster" in r.output
    assert time.time() - t0 < 30
    assert not (tmp_path / "s").exists()


def test_nvjpeg_is_refused_by_the_ray_engine(tmp_path: Path) -> None:
    from embedder.embed.options import RayOptions
    from embedder.embed.ray import extract_ray

    with pytest.raises(RayError, match="use --decoder torchvision"):
        extract_ray([str(tmp_path)], str(tmp_path / "s"), TINY, EmbedOptions(decoder="nvjpeg"), RunOptions(),
                    RayOptions(address="127.0.0.1:1"))


WITHOUT_WEIGHTS = """
import sys, ray
from pathlib import Path
from embedder.errors import RayError
from embedder.embed.fill import EmbedOptions, RunOptions
from embedder.models.features import ModelSpec
from embedder.embed.ray import RayOptions, extract_ray

src, store, empty_home = sys.argv[1:4]
# this driver's TORCH_HOME has the weights; the workers' (their runtime environment) does not
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
         runtime_env={"env_vars": {"TORCH_HOME": empty_home, "EMBEDDER_OFFLINE": "1"}})
try:
    extract_ray([src], store, ModelSpec("mobilenet_v2", "IMAGENET1K_V1"), EmbedOptions(), RunOptions(batch_size=4),
                RayOptions())
except RayError as e:
    print("RayError:", e)
    sys.exit(2)
"""


@pytest.mark.slow
def test_a_worker_without_the_weights_is_a_one_line_error_and_nothing_is_written(tmp_path: Path) -> None:
    import os
    import shutil

    from tests.conftest import mobilenet_weights_file

    src = tmp_path / "imgs"
    make_images(src, {"a": 3})
    home = tmp_path / "driver_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(mobilenet_weights_file(), home / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth")
    (tmp_path / "empty_home").mkdir()
    env = {**os.environ, "TORCH_HOME": str(home), "EMBEDDER_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-c", WITHOUT_WEIGHTS, str(src), str(tmp_path / "s"),
                        str(tmp_path / "empty_home")], capture_output=True, text=True, timeout=200, env=env)
    assert r.returncode == 2, r.stdout + r.stderr[-2000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RayError:")]
    assert line and "cannot load the model" in line[0] and "every node needs the same weights" in line[0], r.stdout
    assert "mobilenet_v2" in line[0]
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_ray_index_build_gives_the_local_builds_lists(tmp_path: Path, cluster: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # the adds as Ray tasks (one per run of shards), then one merge: the same codes in the same lists,
    # the same id map and float16 copies, the same tuned recall as the local streamed build
    import faiss

    from embedder.index import ondisk
    from embedder.index import search as index_search
    from embedder.index import stream as index_stream
    from tests.test_bigindex import sharded_store
    from tests.test_index import clustered

    monkeypatch.setattr(index_stream, "BATCH_ROWS", 1024)  # slices of 6,000 rows: two Ray tasks of three shards
    x = clustered(12_000, dim=32)
    store = sharded_store(tmp_path / "s", np.array_split(x, 6))
    home = str(tmp_path / "h")
    common = ["--kind", "ivfpq", "--memory-budget", str(x.nbytes // 4), "--home", home, "--json"]
    runner = CliRunner()
    r = runner.invoke(app, ["index", "build", store, "--name", "local", *common])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["index", "build", store, "--name", "ray", "--engine", "ray", "--address", cluster, *common])
    assert r.exit_code == 0, r.output
    a, b = index_search.LoadedIndex("local", home), index_search.LoadedIndex("ray", home)
    assert "adds as Ray tasks" in b.meta["reason"] and b.meta["on_disk"]["slices"] > 1
    la, lb = faiss.extract_index_ivf(a.index).invlists, faiss.extract_index_ivf(b.index).invlists
    code_size = faiss.extract_index_ivf(a.index).code_size
    for lst in range(la.nlist):
        n = la.list_size(lst)
        assert lb.list_size(lst) == n
        if n:
            assert np.array_equal(faiss.rev_swig_ptr(la.get_ids(lst), n), faiss.rev_swig_ptr(lb.get_ids(lst), n))
            assert np.array_equal(faiss.rev_swig_ptr(la.get_codes(lst), n * code_size),
                                  faiss.rev_swig_ptr(lb.get_codes(lst), n * code_size))
    assert a.ids.equals(b.ids) and np.array_equal(a.lookup_vectors, b.lookup_vectors)
    assert abs(a.meta["quality"]["recall_at_10"] - b.meta["quality"]["recall_at_10"]) <= 0.005
    assert b.search(x[777:778], 1)[0][0]["id"] == "v000777"
    assert sorted(p.name for p in b.dir.iterdir()) == sorted(  # no part files left behind
        ["index.faiss", ondisk.LISTS_FILE, ondisk.TRAINED_FILE, ondisk.IDS_ARROW, "vectors.npy", "index.json"])
    r = runner.invoke(app, ["index", "build", store, "--name", "h", "--kind", "hnsw", "--engine", "ray",
                            "--address", cluster, "--home", home])
    assert r.exit_code == 2 and "--engine ray builds an IVF index with lists on disk" in r.output


@pytest.mark.slow
def test_the_ray_engine_reads_tar_shards_and_tables_as_the_local_one(tmp_path: Path, cluster: str) -> None:
    """Shard members and table rows reach Ray's decode tasks by their recorded location (the same
    read path as a file's), with their labels and captions: the local engine's store."""
    from embedder.embed.options import RayOptions
    from embedder.embed.ray import extract_ray
    from tests.test_shards_tables import write_hf_parquet, write_shards

    files = sorted(make_images(tmp_path / "f", {"red": 6, "blue": 5}, size=(64, 48)))
    write_shards(tmp_path / "s", files, per_shard=4)
    write_hf_parquet(tmp_path / "t.parquet", files, row_group_size=4)
    for src in ([str(tmp_path / "s" / "*.tar")], [str(tmp_path / "t.parquet")]):
        name = "shards" if src[0].endswith(".tar") else "table"
        s = extract_ray(src, str(tmp_path / f"ray-{name}"), TINY, EmbedOptions(), RunOptions(batch_size=4),
                        RayOptions(address=cluster, workers=1))
        local = extract(src, str(tmp_path / f"local-{name}"), TINY, EmbedOptions(), RunOptions(batch_size=4))
        assert (s.done, s.failed) == (local.done, local.failed) == (11, 0)
        ids_r, vec_r = _store_vectors(tmp_path / f"ray-{name}")
        ids_l, vec_l = _store_vectors(tmp_path / f"local-{name}")
        assert ids_r == ids_l
        np.testing.assert_allclose(vec_r, vec_l, atol=1e-5)
        cols = ["id", "label", "caption"]
        assert (Store.open(str(tmp_path / f"ray-{name}")).read(cols).sort_by("id").to_pylist()
                == Store.open(str(tmp_path / f"local-{name}")).read(cols).sort_by("id").to_pylist())
