"""A model's text tower: texts → vectors in the space of its image vectors (CLIP-family models).

The vector is the model's own ``encode_text`` of its own tokenizer's output. A text is refused, never
cut: an empty one has nothing to search by, and one longer than the context length would be
truncated silently by the tokenizer (what follows the cut would not count), so it is a one-line error
naming both lengths (``TextQueryError``: HTTP 400, CLI exit 2).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from embedder.errors import TextQueryError

MAX_CHARS = 10_000  # longer texts are refused before tokenising (no context length is near this)


class TextTower:
    def __init__(self, clip: Any, tokenizer: Callable[[], Any], context_length: int, tokenizer_name: str) -> None:
        self.clip = clip
        self._make_tokenizer = tokenizer  # loaded on first use: image extraction never needs it
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self.context_length = int(context_length)
        self.tokenizer_name = tokenizer_name

    @property
    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer()
            return self._tokenizer

    def spec(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer_name, "context_length": self.context_length}

    def token_count(self, text: str) -> int:
        """Tokens the text takes, start and end tokens included, before any truncation."""
        tok = self.tokenizer
        if hasattr(tok, "encoder") and hasattr(tok, "encode"):  # OpenCLIP's BPE (SimpleTokenizer)
            return len(tok.encode(text)) + 2
        inner = getattr(tok, "tokenizer", None)  # OpenCLIP's HFTokenizer wraps a transformers tokenizer
        if inner is not None:
            return len(inner(text, truncation=False)["input_ids"])
        return len(tok(text)[0].nonzero())  # unknown tokenizer: what it kept (cannot see a cut)

    def check(self, texts: Sequence[str]) -> list[str]:
        out = []
        for n, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise TextQueryError(f"text query {n} is empty: give some words to search by")
            if len(text) > MAX_CHARS:
                raise TextQueryError(f"text query {n} has {len(text)} characters; at most {MAX_CHARS}")
            count = self.token_count(text)
            if count > self.context_length:
                raise TextQueryError(
                    f"text query {n} is {count} tokens; this model reads at most {self.context_length} "
                    "(its context length): shorten it (texts are refused, never silently cut)")
            out.append(text)
        return out

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], device: torch.device, precision: str = "fp32") -> np.ndarray:
        """Texts → float32 [N, dim] (``encode_text``, unnormalised), one pass for the batch."""
        tokens = self.tokenizer(self.check(texts)).to(device)
        if precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            with torch.autocast(device.type, dtype=dtype):
                out = self.clip.encode_text(tokens)
        else:
            out = self.clip.encode_text(tokens)
        return out.float().cpu().numpy()  # type: ignore[no-any-return]
