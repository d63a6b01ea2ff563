"""Resuming a killed run: the run's settings checked against the file, model, optimiser and schedule
state saved and loaded atomically."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from embedder.errors import FinetuneError
from embedder.learn.finetune.options import FinetuneOptions

log = logging.getLogger(__name__)


# settings a resumed run may change: where and how fast it runs, and how long it goes on
RESUMABLE_CHANGES = ("workers", "device", "epochs", "patience", "budget_minutes", "grad_checkpointing",
                     "memory_budget", "precision")  # the last three: what a retry after running out of memory changes


def run_settings(options: FinetuneOptions) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}


def check_resume(path: Path, run_key: dict[str, Any]) -> None:
    """--resume continues the same run: the same classes, images and settings, or a one-line error
    (a resume file written before these were recorded is taken as it is)."""
    earlier = (peek_state(path) or {}).get("run")
    if earlier is None:
        log.warning("%s records no run settings (an older file); resuming without checking them", path)
        return
    if earlier["classes"] != run_key["classes"]:
        raise FinetuneError(f"--resume: {path.name} was written for classes {', '.join(earlier['classes'])[:200]}, "
                            f"not {', '.join(run_key['classes'])[:200]}; rerun without --resume to start over")
    for what in ("train", "val"):
        if earlier[what] != run_key[what]:
            raise FinetuneError(f"--resume: {path.name} was written for {earlier[what]} {what} images, now "
                                f"{run_key[what]}; rerun without --resume to start over")
    diff = [k for k in sorted(set(earlier["settings"]) | set(run_key["settings"]))
            if earlier["settings"].get(k) != run_key["settings"].get(k)]
    if diff:
        k = diff[0]
        raise FinetuneError(f"--resume: {path.name} was written with {k}={earlier['settings'].get(k)!r}, now "
                            f"{run_key['settings'].get(k)!r}{f' (and {len(diff) - 1} more)' if len(diff) > 1 else ''}; "
                            "resume with the same settings or rerun without --resume")


def peek_state(path: Path) -> dict[str, Any] | None:
    """The resume file's run state (no tensors read), or None."""
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        state: dict[str, Any] = json.loads((f.metadata() or {})["state"])
    return state


def save_resume(path: Path, net: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any],
                 ema: Any = None, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Model, optimiser, weight average and run state; EXTRA: other tensors by name (``start.…``: a
    WiSE-FT run's starting head), read back with ``load_extra``."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    opt_state = opt.state_dict()
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous().reshape(v.shape)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"state": json.dumps(state)})
    tmp.replace(path)


def load_resume(path: Path, net: nn.Module,
                 opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        state = json.loads((f.metadata() or {})["state"])
    tensors = load_file(str(path))
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state = opt.state_dict()
    per: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            per.setdefault(int(pid), {})[name] = v
    opt_state["state"] = per
    opt.load_state_dict(opt_state)
    return state, {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}


def load_extra(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors saved under PREFIX (``save_resume``'s EXTRA), the prefix taken off."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
