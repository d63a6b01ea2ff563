"""Zero-shot classification with a CLIP-family model's text tower: class names through prompt templates
into a head of text vectors (OpenCLIP's ``build_zero_shot_classifier``: each prompt's vector
normalised, averaged over the templates, normalised again), applied to the stored image vectors by
cosine. What a user's labels bought is then the linear probe's accuracy over this one, on the same
test images."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
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


def zero_shot_metrics(train: Any, test: Any, templates: Sequence[str] | None, weights: str | None, device: str,
                      *, wanted: bool = True, required: bool = False) -> dict[str, Any] | None:
    """Zero-shot metrics of the model that made TRAIN (a ``probe.Dataset``) on TEST, else on train's
    labelled images (which zero-shot never trains on). None when that model has no text tower and
    zero-shot was not REQUIRED (then: ``ProbeError``), or when it is not WANTED."""
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
    head = build_head(embedder_for(prov, weights, device), train.classes, templates)
    data = test if test is not None and len(test.y) else train
    metrics = evaluate(head, train.classes, data.x, data.y)
    metrics["on"] = "test" if data is test else "train (never trained on)"
    return metrics
