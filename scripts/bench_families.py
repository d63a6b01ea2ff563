"""Backbone families: `embedder extract` against the library's own loop, in one run on one machine.

    python scripts/bench_families.py [--images 600] [--rounds 2] [--service] [--only NAME]
                                     [--runtimes default,torch,onnx]

Per model: a torchvision CNN (MobileNetV2, random weights: speed does not depend on them), timm
models (ResNet-18, ViT-Ti and ViT-S) and OpenCLIP models (MobileCLIP2-S0, ViT-B-32), random weights of the real
architectures. "Library loop" is what each library's README writes: timm's `resolve_model_data_config`
+ `create_transform` (torchvision's `weights.transforms()`; OpenCLIP's `create_model_and_transforms`
for the tag, `encode_image`, MobileCLIP reparameterised as its README says), an `ImageFolder` and a
`DataLoader` (2 workers, batch 32), the model in inference mode. Then, with --service, text-query
and image-query latency through `embedder serve` (a real uvicorn process) on a MobileCLIP2-S0 index:
one client, one query at a time, p50 and p95. `embedder extract` runs as a fresh CLI process into a
fresh store (its img/s is its own count over the run: model loading, discovery and writing included;
"after loading" is over the span the library loop times, from the first image on). Peak RSS: each
in its own process. Rounds are interleaved; ratios per round.

Runtimes (issue 38): one `embedder extract` row per --runtimes entry, "default" being no --runtime
option (auto: what a user gets). The runs share one fresh runtime cache (EMBEDDER_RUNTIME_CACHE), so
the first round's default and onnx rows include the one-off export and auto's trial (reported as
export_s, and start-up = the run's seconds less the images' rate), later rounds read the cache. The
cosine is each row's vectors against the torch row's (eager) of the same round, the worst image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

LOOP = r'''
import sys, time, json, resource, torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
family, name, root = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
if family == "timm":
    import timm
    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
elif family == "open_clip":
    import open_clip
    arch, tag = name.split(":")
    keys = ("mean", "std", "interpolation", "resize_mode")
    cfg = {"image_" + k: v for k, v in open_clip.get_pretrained_cfg(arch, tag).items() if k in keys}
    # the weights file, as a user loads it (pretrained=FILE), the tag's preprocessing
    clip, _, transform = open_clip.create_model_and_transforms(arch, pretrained=sys.argv[4], **cfg)
    clip.eval()
    if "MobileCLIP" in arch:
        from timm.utils.model import reparameterize_model
        clip = reparameterize_model(clip)
    model = clip.encode_image
else:
    from torchvision import models
    weights = models.get_model_weights(name).DEFAULT
    model = models.get_model(name, weights=None).eval()
    model.classifier = torch.nn.Identity()
    transform = weights.transforms()
loader = DataLoader(ImageFolder(root, transform=transform), batch_size=32, num_workers=2)
t0 = time.perf_counter(); n = 0
with torch.inference_mode():
    for x, _ in loader:
        model(x); n += len(x)
s = time.perf_counter() - t0
print(json.dumps({"img_per_s": n / s, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def make_images(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        px = np.clip(rng.normal(120 + 30 * (i % 4), 50, (375, 500, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(d / f"{i:05d}.jpg", quality=90)


def run_loop(family: str, name: str, root: Path, weights: Path | None) -> dict[str, float]:
    r = subprocess.run([sys.executable, "-c", LOOP, family, name, str(root), str(weights)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run_embedder(backbone: str, root: Path, work: Path, weights: Path | None, runtime: str = "default",
                 keep: bool = False) -> dict[str, Any]:
    out = work / f"store-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "embedder", "extract", str(root), "--out", str(out), "--backbone", backbone, "--json"]
    if weights is not None:
        cmd += ["--weights", str(weights)]
    if runtime != "default":
        cmd += ["--runtime", runtime]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    stdout = proc.stdout.read().decode() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit((proc.stderr.read().decode() if proc.stderr else "")[-2000:])
    process_s = time.perf_counter() - t0
    summary = json.loads(stdout[stdout.index("{"):])
    from embedder.store.shards import Store

    store = Store.open(str(out))
    run = store.manifest()["runs"][-1]
    table = store.read(["id", "embedding"]).sort_by("id")
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    st = summary["stages"]
    stream = summary["done"] / st["stream_s"]  # the library loop's span: after the model is loaded
    prepare = st.get("prepare_s", 0.0)
    rt = run.get("runtime") or {}
    return {"img_per_s": summary["images_per_second"], "stream_img_per_s": stream,
            "start_s": summary["seconds"] - st["stream_s"] + prepare, "prepare_s": prepare,
            "process_s": process_s,  # the whole process: Python and torch imports included
            "process_img_per_s": summary["done"] / process_s,
            "runtime": rt.get("name"), "export_s": rt.get("export_s"), "runtime_ms": rt.get("ms"),
            "peak_rss_mib": usage.ru_maxrss / 1024, "vectors": vectors}


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def _post(url: str, body: bytes, ctype: str) -> float:
    import urllib.request

    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=body, headers={"content-type": ctype}, method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:  # noqa: S310 - the local server
        r.read()
    return (time.perf_counter() - t0) * 1000


def bench_service(work: Path, root: Path, weights: Path | None, n: int) -> dict[str, object]:
    """p50/p95 of text and image queries, one at a time, through a real `embedder serve` process."""
    import socket
    import urllib.request
    import uuid

    store, home = work / "clip-store", work / "home"
    name = "open_clip:MobileCLIP2-S0:dfndr2b"
    base = [sys.executable, "-m", "embedder"]
    subprocess.run([*base, "extract", str(root), "--out", str(store), "--backbone", name, "--weights", str(weights),
                    "--json"], check=True, capture_output=True)
    subprocess.run([*base, "index", "build", str(store), "--name", "clip", "--home", str(home)], check=True,
                   capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([*base, "serve", "--home", str(home), "--port", str(port), "--weights",
                               f"clip={weights}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as r:  # noqa: S310
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        words = ["a red shoe", "a dog on the beach", "two cats on a sofa", "a plate of food", "a city at night"]
        images = sorted(root.rglob("*.jpg"))
        text_ms, image_ms = [], []
        for i in range(n + 5):  # the first 5 of each warm up
            body = json.dumps({"text": f"{words[i % len(words)]} {i}", "k": 10}).encode()
            t = _post(url + "/search", body, "application/json")
            boundary = uuid.uuid4().hex
            data = images[i % len(images)].read_bytes()
            form = (f"--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"q.jpg\"\r\n"
                    f"content-type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
            m = _post(url + "/search", form, f"multipart/form-data; boundary={boundary}")
            if i >= 5:
                text_ms.append(t)
                image_ms.append(m)
        def pct(xs: list[float]) -> dict[str, float]:
            return {"p50_ms": round(float(np.percentile(xs, 50)), 1), "p95_ms": round(float(np.percentile(xs, 95)), 1)}
        return {"index_size": len(images), "queries": n, "text": pct(text_ms), "image": pct(image_ms)}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--service", action="store_true", help="also text and image query latency through the service")
    ap.add_argument("--queries", type=int, default=100, help="--service: queries of each kind")
    ap.add_argument("--only", default="", help="only the backbones whose name contains one of these (comma-separated)")
    ap.add_argument("--runtimes", default="default",
                    help="embedder rows, comma-separated: default (no --runtime: auto), torch, onnx, auto")
    args = ap.parse_args()
    runtimes = [r for r in args.runtimes.split(",") if r]
    import torch

    work = Path(tempfile.mkdtemp(prefix="bench_families_"))
    os.environ["EMBEDDER_RUNTIME_CACHE"] = str(work / "runtime-cache")  # a fresh one: round 1 exports
    try:
        root = work / "imgs"
        make_images(root, args.images)
        models: list[tuple[str, str, str, Path | None]] = []
        mv2 = work / "mobilenet_v2.pth"
        from torchvision import models as tvm

        torch.manual_seed(0)
        torch.save(tvm.mobilenet_v2(weights=None).state_dict(), mv2)
        models.append(("torchvision", "mobilenet_v2", "mobilenet_v2", mv2))
        import timm

        for name in ("resnet18", "vit_tiny_patch16_224", "vit_small_patch16_224"):
            f = work / f"{name}.pth"
            torch.save(timm.create_model(name, pretrained=False).state_dict(), f)
            models.append(("timm", name, f"timm:{name}", f))
        import open_clip

        for name in ("MobileCLIP2-S0:dfndr2b", "ViT-B-32:laion2b_s34b_b79k"):
            f = work / f"{name.split(':')[0]}.pth"
            torch.save(open_clip.create_model(name.split(":")[0], pretrained=None).state_dict(), f)
            models.append(("open_clip", name, f"open_clip:{name}", f))
        if args.service:
            print(json.dumps({"service": bench_service(work, root, models[-2][3], args.queries)}, indent=1),
                  flush=True)
        only = [o for o in args.only.split(",") if o]
        models = [m for m in models if not only or any(o in m[2] for o in only)]
        rows: dict[str, dict[str, list[Any]]] = {}
        for _ in range(args.rounds):
            for family, name, backbone, wfile in models:
                lib = run_loop(family, name, root, wfile)
                eager = None
                if len(runtimes) > 1 and "torch" in runtimes:  # the reference for the cosine, first
                    order = ["torch"] + [r for r in runtimes if r != "torch"]
                else:
                    order = runtimes
                for runtime in order:
                    emb = run_embedder(backbone, root, work, wfile, runtime)
                    if runtime == "torch":
                        eager = emb["vectors"]
                    label = f"{family} {name}" + ("" if runtimes == ["default"] else f" [{runtime}]")
                    r = rows.setdefault(label, {})
                    def add(key: str, v: Any) -> None:
                        r.setdefault(key, []).append(v)  # noqa: B023 - used at once
                    add("library", round(lib["img_per_s"], 1))
                    add("embedder", round(emb["img_per_s"], 1))
                    add("ratio", round(emb["img_per_s"] / lib["img_per_s"], 2))
                    add("embedder_after_loading", round(emb["stream_img_per_s"], 1))
                    add("ratio_after_loading", round(emb["stream_img_per_s"] / lib["img_per_s"], 2))
                    add("ratio_process", round(emb["process_img_per_s"] / lib["img_per_s"], 2))
                    add("start_s", round(emb["start_s"], 2))
                    add("runtime", emb["runtime"])
                    add("export_s", emb["export_s"])
                    add("runtime_ms", emb["runtime_ms"])
                    if eager is not None and runtime != "torch":
                        add("cosine_to_eager", round(min_cosine(emb["vectors"], eager), 6))
                    add("rss_library", round(lib["peak_rss_mib"]))
                    add("rss_embedder", round(emb["peak_rss_mib"]))
        print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores", "images": args.images,
                          "rows": rows}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
