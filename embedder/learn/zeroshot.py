"""Zero-shot classification with a CLIP-family model's text tower: class names through prompt templates
into a head of text vectors (OpenCLIP's ``build_zero_shot_classifier``: each prompt's vector
normalised, averaged over the templates, normalised again), applied to the stored image vectors by
cosine. What a user's labels bought is then the linear probe's accuracy over this one, on the same
test images."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedder.errors import ProbeError

log = logging.getLogger(__name__)


def default_templates() -> list[str]:
    """OpenCLIP's short prompt ensemble (from the CLIP authors' prompt-engineering notebook), as text."""
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    return [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]


def class_text(label: str) -> str:
    """A folder-style class name as words: ``golden_retriever`` → ``golden retriever``."""
    return " ".join(label.replace("_", " ").replace("-", " ").split())


@dataclass
class ZeroShotHead:
    weights: np.ndarray  # [classes, dim], unit rows
    templates: list[str]
    logit_scale: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return self.logit_scale * (x @ self.weights.T)  # type: ignore[no-any-return]


def build_head(emb: Any, classes: Sequence[str], templates: Sequence[str] | None = None) -> ZeroShotHead:
    """The zero-shot head of EMB's model (a ``BatchEmbedder`` with a text tower) for CLASSES."""
    text = emb.loaded.text
    if text is None:
        raise ProbeError(f"{emb.loaded.backbone.name} cut at {emb.loaded.layer} has no text tower: zero-shot needs "
                         "a CLIP-family backbone's own image embedding")
    return text_head(text, classes, templates, emb.device)


def text_head(text: Any, classes: Sequence[str], templates: Sequence[str] | None = None,
              device: Any = "cpu") -> ZeroShotHead:
    """The zero-shot head of a text tower (``models.text.TextTower``) for CLASSES: OpenCLIP's own
    ``build_zero_shot_classifier`` over the prompt TEMPLATES, and the model's logit scale."""
    import torch
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    templates = list(templates) if templates else default_templates()
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ProbeError(f"a prompt template holds the class name as {{}} exactly once, e.g. 'a photo of a {{}}.'; "
                         f"got {bad[0]!r}")
    names = [class_text(c) for c in classes]
    text.check([t.format(n) for n in names for t in templates])  # none over the context length
    with torch.inference_mode():
        w = build_zero_shot_classifier(text.clip, text.tokenizer, names, templates, num_classes_per_batch=10,
                                       device=device)
        scale = float(text.clip.logit_scale.exp().item()) if hasattr(text.clip, "logit_scale") else 100.0
    return ZeroShotHead(w.T.float().cpu().numpy(), templates, scale)


def evaluate(head: ZeroShotHead, classes: list[str], x: Any, y: np.ndarray) -> dict[str, Any]:
    """Accuracy of HEAD on the rows of X (a matrix, or rows streamed from a store) with a known class."""
    from sklearn.metrics import balanced_accuracy_score

    from embedder.learn.probe import as_rows

    pred = np.empty(len(y), np.int64)
    top5 = np.zeros(len(y), bool)
    for start, block in as_rows(x).chunks():
        logits = head.logits(block)
        pred[start:start + len(block)] = logits.argmax(1)
        if len(classes) > 5:
            top5[start:start + len(block)] = (np.argsort(-logits, axis=1)[:, :5]
                                              == y[start:start + len(block), None]).any(1)
    known = y >= 0
    pred, yk = pred[known], y[known]
    out: dict[str, Any] = {"accuracy": float((pred == yk).mean()),
                           "balanced_accuracy": float(balanced_accuracy_score(yk, pred)),
                           "n": int(len(yk)), "templates": head.templates}
    if len(classes) > 5:
        out["top5_accuracy"] = float(top5[known].mean())
    return out


def numeric_classes(classes: Sequence[str]) -> bool:
    """Class names that are numbers (a WebDataset's ``.cls``, a table's ClassLabel codes): a text tower
    reads them as "a photo of a 0.", which measures nothing about the images."""
    return bool(classes) and all(c.strip().lstrip("-").isdigit() for c in classes)


def read_class_names(path: str | Path, classes: Sequence[str]) -> dict[str, str]:
    """The words zero-shot prompts for each class, from PATH: ``label,name`` rows (CSV, a header
    optional) or one name per line in the order of the numeric labels (line 0 names class 0). Every
    class must be named; a ``ProbeError`` says which is not."""
    import csv

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProbeError(f"cannot read class names from {path}: {e}") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    rows = list(csv.reader(lines))
    if rows and all(len(r) >= 2 for r in rows):
        names = {r[0].strip(): r[1].strip() for r in rows if r[0].strip() and r[1].strip()}
        names.pop("label", None)  # a header row
    else:
        names = {str(i): ln.strip() for i, ln in enumerate(lines)}
    missing = [c for c in classes if c not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ProbeError(f"{path} names no class {missing[0]!r}{more}: give label,name rows, or one name per "
                         "line in the order of the labels 0, 1, …")
    return {c: names[c] for c in classes}


def zero_shot_metrics(train: Any, test: Any, templates: Sequence[str] | None, weights: str | None, device: str,
                      *, wanted: bool = True, required: bool = False,
                      class_names: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Zero-shot metrics of the model that made TRAIN (a ``probe.Dataset``) on TEST, else on train's
    labelled images (which zero-shot never trains on). None when that model has no text tower and
    zero-shot was not REQUIRED (then: ``ProbeError``), or when it is not WANTED. Classes that are
    numbers and no CLASS_NAMES: refused when REQUIRED, else ``{"skipped": why}`` (never an accuracy of
    prompts like "a photo of a 0." printed beside the probe's as if comparable)."""
    from embedder.embed.query import embedder_for
    from embedder.store.provenance import Provenance

    prov = Provenance.from_dict(train.provenance)
    if not wanted:
        return None
    refusal = prov.text_refusal("the store")
    if refusal is not None:  # no text tower, or vectors that are not the image embedding it shares
        if required:
            raise ProbeError(f"zero-shot compares class names' text vectors with the model's image embedding; "
                             f"{refusal}")
        log.info("no zero-shot accuracy: %s", refusal)
        return None
    if weights is None and prov.weights.needs_file:
        from embedder.store.remembered import remembered_weights

        weights = remembered_weights(getattr(train, "store", ""), prov.weights.sha256)
    if prov.weights.needs_file and weights is None:  # the text tower is in that file: the probe needs neither
        why = (f"the store was made with the weights file {prov.weights.name}, which holds the text tower: "
               "pass it with --weights FILE")
        if required:
            raise ProbeError(f"zero-shot needs the model that made the store: {why}")
        log.info("no zero-shot accuracy: %s", why)
        return {"skipped": why}
    if class_names is None and numeric_classes(train.classes):
        why = (f"the class names are numbers ({', '.join(train.classes[:3])}, …): prompts would read "
               f"'a photo of a {train.classes[0]}.'; give --class-names FILE (label,name rows, or one name per line)")
        if required:
            raise ProbeError(f"zero-shot needs class names as words: {why}")
        log.info("no zero-shot accuracy: %s", why)
        return {"skipped": why}
    words = [class_names[c] for c in train.classes] if class_names else list(train.classes)
    head = build_head(embedder_for(prov, weights, device), words, templates)
    data = test if test is not None and len(test.y) else train
    metrics = evaluate(head, train.classes, data.x, data.y)
    metrics["on"] = "test" if data is test else "train (never trained on)"
    return metrics
