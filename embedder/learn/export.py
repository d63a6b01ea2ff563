"""Deploy what was trained: a fine-tuned checkpoint, or a frozen backbone with a probe, as ONE ONNX model
(pixels in, class probabilities out) with its preprocessing and class names beside it.

What the model computes is what ``embedder predict`` computes, from the pixels on:

- its input is ``pixels``: uint8, RGB, NCHW, ``[batch, 3, crop, crop]``, values 0..255: the image resized
  and centre-cropped as the JSON's ``preprocessing`` says (the batch axis is dynamic). The mean/std
  normalisation is inside the graph, as ``BatchEmbedder`` does it (``x / 255``, minus mean, over std);
- a checkpoint: the fine-tuned network (backbone and its trained head; a CLIP model's image embedding is
  L2-normalised before its head, as in training);
- a probe: the feature model its training store was made with (``embedder_for`` the store's
  provenance: backbone, weights, layer, pooling), L2-normalised where the store's vectors were, the
  probe's standardisation, its linear head;
- then a softmax: its output is ``probabilities``, float32 ``[batch, classes]``, in the order of the
  JSON's ``classes``.

The model is exported in fp32 by torch's TorchScript-based exporter (``torch.onnx.export(dynamo=False)``:
it needs no package beyond ``onnx``, where the ``torch.export`` path needs onnxscript too), then checked:
onnxruntime runs it on random images at two batch sizes other than the traced one, and its
probabilities must equal the PyTorch module's within a tolerance, or the export is refused. An
operator ONNX cannot express is refused in one line that names it and the module it is in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedder.errors import ExportError, ProbeError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from embedder.models.preprocessing import Preprocessing

log = logging.getLogger(__name__)

FORMATS = ("onnx",)
FORMAT_VERSION = "embedder-export/1"
MODEL_FILE = "model.onnx"
META_FILE = "embedder-export.json"
INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
DEFAULT_TOLERANCE = 1e-4  # max |p_onnxruntime - p_torch| over the check's images
TRACE_BATCH = 2
CHECK_BATCHES = (3, 1)  # not the traced batch: a batch size baked into the graph is caught


@dataclass(frozen=True)
class Deployable:
    """What an export computes, before any format: NETWORK on normalised float pixels, then (each when
    set) L2 normalisation, standardisation ``(x - mean) / scale``, a linear HEAD, and the softmax."""

    network: nn.Module  # float [N,3,crop,crop], normalised as PREPROCESSING says → features or logits
    preprocessing: Preprocessing
    classes: tuple[str, ...]
    source: dict[str, Any]  # what it was made from (written to the JSON)
    l2: bool = False
    standardize: tuple[np.ndarray, np.ndarray] | None = None  # (mean, scale) of the head's input
    head: nn.Linear | None = None
    decoder: str = "pil"  # how embedder decoded the pixels it classifies (the JSON says, for the record)
    notes: tuple[str, ...] = ()  # where the export computes other than the source did (precision)

    def module(self) -> nn.Module:
        """The whole computation as one eval-mode module: uint8 pixels in, probabilities out."""
        return _deployed_class()(self)


@dataclass(frozen=True)
class ExportResult:
    out_dir: str
    model: str
    metadata: str
    format: str
    opset: int
    classes: tuple[str, ...]
    source: dict[str, Any]
    max_abs_diff: float  # onnxruntime against PyTorch, probabilities, over the check's images
    tolerance: float
    onnxruntime: str
    size_bytes: int
    seconds: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "model": self.model, "metadata": self.metadata, "format": self.format,
                "opset": self.opset, "classes": list(self.classes), "source": self.source,
                "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance, "onnxruntime": self.onnxruntime,
                "size_bytes": self.size_bytes, "seconds": round(self.seconds, 2), "notes": list(self.notes)}


def export(path: str | Path, out_dir: str | Path, format: str = "onnx", opset: int | None = None, *,
           weights: str | None = None, force: bool = False, tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """An ``embedder finetune`` checkpoint or a probe file PATH as ``OUT_DIR/model.onnx`` and
    ``OUT_DIR/embedder-export.json`` (see the module's docstring). WEIGHTS: the weights file a probe's
    store was made from, when it was (as ``embedder predict --weights``). OUT_DIR must be new or
    empty; FORCE replaces the two files in a folder that is not (nothing else in it is touched)."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
    _require_runtime()
    _check_opset(opset)
    _check_out_dir(Path(out_dir), force)
    return write_onnx(deployable(Path(path), weights), out_dir, opset=opset, force=force, tolerance=tolerance)


def deployable(path: Path, weights: str | None = None) -> Deployable:
    """PATH, a checkpoint or a probe file (told apart by content), as what its export computes."""
    from embedder.models import checkpoint

    if not path.is_file():
        raise ExportError(f"{path} does not exist (give an `embedder finetune` checkpoint or an `embedder probe` file)")
    if checkpoint.is_checkpoint(path):
        return _from_checkpoint(path)
    return _from_probe(path, weights)


def _from_checkpoint(path: Path) -> Deployable:
    from embedder.embed.options import EmbedOptions
    from embedder.models.classifier import from_checkpoint
    from embedder.models.origin import sha256_file

    net, pre, classes, meta = from_checkpoint(path)
    source = {"kind": "checkpoint", "path": str(path.resolve()), "sha256": sha256_file(path),
              "backbone": meta.get("backbone"), "pretrained": meta.get("pretrained")}
    # EmbedOptions' decoder: the one `embedder predict CHECKPOINT` decodes with
    return Deployable(net.eval(), pre, tuple(classes), source, decoder=EmbedOptions().decoder)


def _from_probe(path: Path, weights: str | None) -> Deployable:
    import torch
    from torch import nn

    from embedder.embed.query import embedder_for
    from embedder.learn.probe import load_probe
    from embedder.models.origin import sha256_file
    from embedder.store.provenance import Provenance

    try:
        head, meta = load_probe(path)
    except ProbeError:
        raise ExportError(f"{path} is neither an `embedder finetune` checkpoint nor an `embedder probe` file") from None
    prov = Provenance.from_dict(meta["provenance"])
    emb = embedder_for(prov, weights, "cpu", store=meta.get("store"))  # the feature model of the probe's store
    coef = torch.from_numpy(np.asarray(head.coef, np.float32))
    linear = nn.Linear(coef.shape[1], coef.shape[0])
    with torch.no_grad():
        linear.weight.copy_(coef)
        linear.bias.copy_(torch.from_numpy(np.asarray(head.intercept, np.float32)))
    notes: tuple[str, ...] = ()
    if prov.precision != "fp32":
        notes = (f"the probe's store was embedded in {prov.precision}; the exported model computes in fp32 "
                 "(probabilities differ from `embedder predict`'s by that precision's rounding)",)
    source = {"kind": "probe", "path": str(path.resolve()), "sha256": sha256_file(path),
              "backbone": prov.backbone, "weights": prov.weights.to_dict(), "layer": prov.layer, "pool": prov.pool,
              "normalize": prov.normalize, "precision": prov.precision}
    return Deployable(emb.loaded.model.eval(), emb.loaded.preprocessing, tuple(meta["classes"]), source,
                      l2=prov.normalize == "l2" or head.normalize,
                      standardize=(np.asarray(head.mean, np.float32), np.asarray(head.scale, np.float32)),
                      head=linear.eval(), decoder=prov.decoder, notes=notes)


_DEPLOYED: type | None = None


def _deployed_class() -> type:
    """``_Deployed``, defined on first use (torch loads only where a model is exported)."""
    global _DEPLOYED
    if _DEPLOYED is not None:
        return _DEPLOYED
    import torch
    from torch import nn

    class _Deployed(nn.Module):
        def __init__(self, dep: Deployable) -> None:
            super().__init__()
            pre = dep.preprocessing
            self.net = dep.network
            self.mean: torch.Tensor
            self.std: torch.Tensor
            self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1))
            self.l2 = dep.l2
            self.standardized = dep.standardize is not None
            if dep.standardize is not None:
                self.register_buffer("feature_mean", torch.from_numpy(np.asarray(dep.standardize[0], np.float32)))
                self.register_buffer("feature_scale", torch.from_numpy(np.asarray(dep.standardize[1], np.float32)))
            self.head = dep.head
            self.eval()

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            x = (pixels.float() / 255.0 - self.mean) / self.std  # as decode.normalize_batch
            y = self.net(x).float()
            if y.ndim > 2:
                y = y.flatten(1)
            if self.l2:
                y = nn.functional.normalize(y, dim=1)
            if self.standardized:
                y = (y - self.feature_mean) / self.feature_scale
            if self.head is not None:
                y = self.head(y)
            return torch.softmax(y, dim=1)

    _DEPLOYED = _Deployed
    return _Deployed


def write_onnx(dep: Deployable, out_dir: str | Path, *, opset: int | None = None, force: bool = False,
               tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """DEP as ``OUT_DIR/model.onnx`` and its description ``OUT_DIR/embedder-export.json``, verified
    by onnxruntime against the PyTorch module; nothing is left in OUT_DIR when any step fails."""
    import torch

    t0 = time.perf_counter()
    onnx, ort = _require_runtime()
    _check_opset(opset)
    out = Path(out_dir)
    created = _check_out_dir(out, force)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        module = dep.module()
        crop = dep.preprocessing.crop_size
        fixed_size(module, crop)
        example = torch.randint(0, 256, (TRACE_BATCH, 3, crop, crop), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(0))
        mha = getattr(torch.backends, "mha", None)  # torch >= 2.3; before it, no fused kernel to turn off
        fastpath = mha.get_fastpath_enabled() if mha is not None else False
        if mha is not None:
            mha.set_fastpath_enabled(False)  # nn.MultiheadAttention's fused kernel has no ONNX form
        try:
            _to_onnx(module, example, tmp / MODEL_FILE, opset)
            imports = onnx.load(str(tmp / MODEL_FILE), load_external_data=False).opset_import
            opset_used = next(int(o.version) for o in imports if o.domain in ("", "ai.onnx"))
            diff = _verify(module, tmp / MODEL_FILE, ort, crop, len(dep.classes), tolerance)
        finally:
            if mha is not None:
                mha.set_fastpath_enabled(fastpath)
        meta = _description(dep, opset_used, ort.__version__, diff, tolerance)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for f in sorted(tmp.iterdir()):  # the model, external weight files where torch wrote any, the JSON
            os.replace(f, out / f.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    model = out / MODEL_FILE
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file() and f.name != META_FILE)
    return ExportResult(str(out), str(model), str(out / META_FILE), "onnx", opset_used, dep.classes, dep.source,
                        diff, tolerance, ort.__version__, size, time.perf_counter() - t0, dep.notes)


def _require_runtime() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise ExportError("exporting to ONNX needs onnx and onnxruntime: pip install 'embedder[onnx]'") from None
    return onnx, ort


def _opset_range() -> tuple[int, int]:
    try:
        from torch.onnx import _constants as c

        return int(c.ONNX_MIN_OPSET), int(c.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):  # pragma: no cover - another torch's layout
        return 7, 20


def _check_opset(opset: int | None) -> None:
    if opset is None:
        return
    low, high = _opset_range()
    if not low <= opset <= high:
        raise ExportError(f"--opset {opset} is out of range: torch's ONNX exporter writes opsets {low} to {high}")


def _check_out_dir(out: Path, force: bool) -> bool:
    """Whether OUT is to be created; refuses a file, or a non-empty folder without FORCE."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} is not empty; pass --force to replace its {MODEL_FILE} and {META_FILE}")
    return not out.exists()


def fixed_size(module: nn.Module, crop: int) -> None:
    """timm ViTs built to take other sizes (``dynamic_img_size``) resample their position embeddings
    in every forward (an antialiased bicubic ONNX has no operator for); set to the one size the export
    takes (timm's ``set_input_size``), they are resampled once, here, and the graph has none of it."""
    for m in module.modules():
        if getattr(m, "dynamic_img_size", False) and hasattr(m, "set_input_size"):
            m.set_input_size(img_size=crop)  # type: ignore[operator]


def _to_onnx(module: nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> None:
    import torch

    try:
        with torch.no_grad(), warnings.catch_warnings(), _quiet_stdout():
            # tracer warnings (Python conditions on shapes) are caught by the check at other batch sizes
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              do_constant_folding=True)
    except torch.onnx.errors.UnsupportedOperatorError as e:
        op = re.search(r"'([\w:.]+)'", str(e))
        name = op.group(1) if op else "an operator"
        where = _where(module, example, name) if op else None
        raise ExportError(f"cannot export to ONNX: {name} has no ONNX equivalent{where or ''} "
                          f"(opset {opset or 'default'})") from None
    except (torch.onnx.errors.OnnxExporterError, RuntimeError, ValueError, TypeError) as e:
        raise ExportError(f"cannot export to ONNX: {_first_line(e)}") from None


def _where(module: nn.Module, example: torch.Tensor, op: str) -> str | None:
    """' in MODULE (Class)': the model's module that calls OP, from a trace's scope names."""
    import torch

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, (example,), check_trace=False)
        scope = next((n.scopeName() for n in traced.inlined_graph.nodes() if n.kind() == op), "")
    except Exception:  # noqa: BLE001 - the name is a courtesy; the refusal stands without it
        return None
    name = scope.rpartition("/")[2].removeprefix("__module.")
    if not name:
        return None
    try:
        kind = type(module.get_submodule(name)).__name__
    except AttributeError:
        kind = "?"
    shown = name.removeprefix("net.") if name != "net" else "the backbone"
    return f" in {shown} ({kind})"


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """The TorchScript exporter writes the whole graph to the process's standard output (from C++)
    when it fails: that goes to a scratch file, so a refusal stays one line."""
    import ctypes
    import sys

    libc = ctypes.CDLL(None)
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)


def _first_line(e: BaseException, limit: int = 400) -> str:
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return line if len(line) <= limit else f"{line[:limit - 1]}…"


def _verify(module: nn.Module, path: Path, ort: Any, crop: int, n_classes: int, tolerance: float) -> float:
    """onnxruntime against MODULE on random images at batch sizes other than the traced one: the
    largest difference of a probability; refused beyond TOLERANCE."""
    import torch

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4  # its errors come back as exceptions; its log would print them twice
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types; any means "cannot run it"
        raise ExportError(f"onnxruntime {ort.__version__} cannot load the exported model: {_first_line(e)}") from None
    rng = np.random.default_rng(0)
    diff = 0.0
    for batch in CHECK_BATCHES:
        x = rng.integers(0, 256, (batch, 3, crop, crop), dtype=np.uint8)
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
        try:
            got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        except Exception as e:  # noqa: BLE001 - as above
            raise ExportError(f"onnxruntime {ort.__version__} cannot run the exported model at batch {batch} "
                              f"(a size fixed in the traced graph?): {_first_line(e, 240)}") from None
        if got.shape != (batch, n_classes):
            raise ExportError(f"the exported model gives shape {list(got.shape)} at batch {batch}, "
                              f"not [{batch}, {n_classes}] (a batch size fixed in the graph?)")
        d = float(np.abs(got.astype(np.float64) - want).max())
        if not np.isfinite(d) or d > tolerance:
            raise ExportError(f"the exported model's probabilities differ from PyTorch's by up to {d:.3g} "
                              f"(tolerance {tolerance:g}); not exported")
        diff = max(diff, d)
    return diff


def _description(dep: Deployable, opset: int, ort_version: str, diff: float, tolerance: float) -> dict[str, Any]:
    import torch

    pre = dep.preprocessing
    crop = pre.crop_size
    resize = (f"both sides to {crop} (aspect ratio not kept)" if pre.resize_mode == "squash"
              else f"the shorter side to {pre.resize_size}")
    return {
        "format": FORMAT_VERSION,
        "model": MODEL_FILE,
        "classes": list(dep.classes),
        "preprocessing": {**pre.to_dict(),
                          "steps": f"decode to RGB; resize {resize} ({pre.interpolation}"
                                   f"{', antialiased' if pre.antialias else ''}); centre-crop {crop}x{crop}; "
                                   "uint8 NCHW. The mean/std normalisation is inside the model.",
                          "decoder": dep.decoder},
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW", "channels": "RGB",
                  "shape": ["batch", 3, crop, crop], "range": [0, 255]},
        "output": {"name": OUTPUT_NAME, "kind": "probabilities", "dtype": "float32",
                   "shape": ["batch", len(dep.classes)],
                   "what": "softmax probabilities, one column per entry of classes, in that order"},
        "precision": "fp32",
        "source": dep.source,
        "opset": opset,
        "exporter": f"torch {torch.__version__} (TorchScript-based torch.onnx.export)",
        "verification": {"onnxruntime": ort_version, "max_abs_diff": diff, "tolerance": tolerance,
                         "against": "the PyTorch module, random uint8 images", "batch_sizes": list(CHECK_BATCHES)},
        "notes": list(dep.notes),
    }
