"""A time budget turned into a plan: steps timed on this machine, then the epochs and image size that
fit."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from embedder.errors import FinetuneError
from embedder.learn.finetune.options import BudgetPlan

BUDGET_MIN_EPOCHS = 3  # full-phase epochs a budget must leave room for before the size drops


BUDGET_MAX_EPOCHS = 30


BUDGET_SIZE_FACTORS = (1.0, 6 / 7, 5 / 7, 4 / 7, 3 / 7)  # 224 → 224, 192, 160, 128, 96


def budget_sizes(full: int) -> list[int]:
    """Candidate crop sizes, largest first: the weights' own and smaller, multiples of 8, ≥ 16."""
    return sorted({min(full, max(16, round(full * f / 8) * 8)) for f in BUDGET_SIZE_FACTORS}, reverse=True)


def plan_budget(budget_s: float, full: int, train_step_s: float, eval_step_s: float, train_steps: int,
                val_steps: int, probe_steps: int, head_epochs: int,
                accepts: Callable[[int], bool] | None = None) -> BudgetPlan:
    """The largest crop size at which the probe and ``head_epochs + BUDGET_MIN_EPOCHS`` epochs fit in
    BUDGET_S, and as many epochs as fit there (at most BUDGET_MAX_EPOCHS). Step costs are measured
    at size FULL and scale with the pixel count."""
    sizes = [s for s in budget_sizes(full) if s == full or accepts is None or accepts(s)]  # a ViT without
    # interpolated position embeddings takes its own size only
    epoch_full = train_steps * train_step_s + val_steps * eval_step_s
    probe_full = probe_steps * eval_step_s
    for size in sizes:
        r = (size / full) ** 2
        epoch_s, probe_s = epoch_full * r, probe_full * r
        fits = int((budget_s - probe_s) // epoch_s) if epoch_s > 0 else BUDGET_MAX_EPOCHS
        wanted = head_epochs + BUDGET_MIN_EPOCHS
        if fits >= wanted or size == sizes[-1]:
            if fits < 1:
                raise FinetuneError(f"a {budget_s / 60:.1f}-minute budget does not fit one epoch even at "
                                    f"{size} px (≈ {probe_s + epoch_s:.0f} s with the probe): raise --budget")
            epochs = min(BUDGET_MAX_EPOCHS, fits)
            why = (f"{size} px: the largest size where the probe and {wanted} epochs fit" if fits >= wanted
                   else f"{size} px, the smallest size: only {fits} epoch(s) fit")
            return BudgetPlan(round(budget_s, 1), size, epochs, round(epoch_s, 2), round(probe_s, 2),
                              f"{why}; ≈ {epoch_s:.1f} s per epoch, probe ≈ {probe_s:.1f} s")
    raise AssertionError("unreachable: the last size always returns")  # pragma: no cover


def time_steps(net: nn.Module, size: int, batch: int, device: torch.device,
               amp: torch.dtype | None) -> tuple[float, float]:
    """Seconds per training step (forward, backward, AdamW) and per evaluation batch at SIZE, on a
    copy of the model (the real one is untouched): one warm-up step, then the mean of two."""
    import copy

    twin = copy.deepcopy(net).to(device)
    twin.requires_grad_(True)
    opt = torch.optim.AdamW(twin.parameters(), lr=0.0)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = nn.functional.cross_entropy(twin(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def eval_step() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            twin(x)

    out = []
    for step, mode in ((train_step, True), (eval_step, False)):
        twin.train(mode)
        step()
        sync()
        t0 = time.perf_counter()
        for _ in range(2):
            step()
        sync()
        out.append((time.perf_counter() - t0) / 2)
    return out[0], out[1]


# ---- memory ------------------------------------------------------------------------------------
MEMORY_MARGIN = 1.25  # allocator slack and temporaries over what autograd keeps (ViT-S batch 16 on CPU: the
# estimate with it was 1.05x the measured peak RSS growth, 0.8-1.0x with gradient checkpointing)


def saved_bytes(net: nn.Module, size: int, device: torch.device, amp: torch.dtype | None, images: int) -> int:
    """Bytes autograd keeps for the backward pass of IMAGES blank images, as the model trains (train
    mode, its trainable parameters, gradient checkpointing as set): ``saved_tensors_hooks`` counting
    each saved storage once, parameters left out (their bf16 copies under autocast are counted)."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    was = net.training
    buffers = {k: v.clone() for k, v in net.named_buffers()}  # BatchNorm statistics: left as they were
    net.train()
    x = torch.zeros(images, 3, size, size, device=device)
    try:
        with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = net(x)
        del out
    finally:
        net.train(was)
        with torch.no_grad():
            for k, v in net.named_buffers():
                v.copy_(buffers[k])
    return sum(seen.values())


def saved_bytes_for(net: nn.Module, size: int, device: torch.device, amp: torch.dtype | None, batch: int) -> int:
    """What autograd keeps for BATCH images: measured at 2 and 4 images and extrapolated, so that a part
    that does not grow with the batch (autocast's bf16 copies of the weights) is counted once."""
    two, four = (saved_bytes(net, size, device, amp, n) for n in (2, 4))
    per = max(four - two, 0) // 2
    return max(two - 2 * per, 0) + per * batch


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """What the run may use when no --memory-budget is given: the GPU's free memory, or the
    machine's MemAvailable; None where it cannot be known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"{device} free memory"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "this machine's available memory"
    except OSError:
        return None
    return None


def memory_need(net: nn.Module, size: int, batch: int, device: torch.device, amp: torch.dtype | None,
                checkpointing: bool = False, toggle: Any = None, blocks: int = 1) -> dict[str, int]:
    """Bytes a training step holds: every weight, a gradient and AdamW's two moments per trainable
    one, and what autograd keeps for BATCH images (measured, ``saved_bytes_for``). With
    gradient checkpointing on, backward also recomputes one of BLOCKS blocks at a time: twice a
    block's share of the unchekpointed activations (measured with TOGGLE turning it off) is added."""
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    trainable = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    acts = saved_bytes_for(net, size, device, amp, batch)
    if checkpointing and toggle is not None:
        toggle(False)
        try:
            full = saved_bytes_for(net, size, device, amp, batch)
        finally:
            toggle(True)
        acts += 2 * full // max(blocks, 1)
    return {"weights": weights, "gradients_and_adamw": 3 * trainable, "activations": acts,
            "total": int((weights + 3 * trainable + acts) * MEMORY_MARGIN)}


def check_memory(net: nn.Module, name: str, size: int, batch: int, device: torch.device, amp: torch.dtype | None,
                 budget: tuple[int, str] | None, checkpointing: bool, can_checkpoint: Any,
                 blocks: int = 1) -> dict[str, int]:
    """The step's memory need; over BUDGET, a one-line FinetuneError naming what fits: gradient
    checkpointing (CAN_CHECKPOINT: a function turning it on or off, None where the model has none),
    then the largest batch that fits."""
    try:
        need = memory_need(net, size, batch, device, amp, checkpointing, can_checkpoint, blocks)
    except torch.OutOfMemoryError:
        raise FinetuneError(f"fine-tuning {name} at {size} px runs out of memory in a forward pass of 4 images: "
                            "lower --image-size, or choose a smaller model") from None
    if budget is None or need["total"] <= budget[0]:
        return need
    limit, what = budget
    fix = ""
    if not checkpointing and can_checkpoint is not None:
        can_checkpoint(True)
        try:
            with_ck = memory_need(net, size, batch, device, amp, True, can_checkpoint, blocks)
        finally:
            can_checkpoint(False)
        if with_ck["total"] <= limit:
            fix = f"--grad-checkpointing fits it (≈ {human(with_ck['total'])})"
    if not fix:
        fixed = need["total"] - need["activations"] * MEMORY_MARGIN
        per = need["activations"] * MEMORY_MARGIN / batch
        fits = int((limit - fixed) // per) if per > 0 and limit > fixed else 0
        fix = (f"--batch-size {fits} fits it" if fits >= 1 else
               f"not even one image fits: its weights and AdamW state alone take ≈ {human(int(fixed))}; "
               "choose a smaller model")
    raise FinetuneError(
        f"fine-tuning {name} at batch {batch}, {size} px needs ≈ {human(need['total'])} (weights "
        f"{human(need['weights'])}, gradients + AdamW {human(need['gradients_and_adamw'])}, activations "
        f"{human(need['activations'])}) but {what} is {human(limit)}; {fix}")


def human(n: int) -> str:
    for unit, size in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def takes_size(net: nn.Module, size: int, device: torch.device) -> bool:
    """Whether NET runs on SIZE-pixel images (one blank image, no gradients, eval mode)."""
    import contextlib
    import io

    was = net.training
    net.eval()
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            net(torch.zeros(1, 3, size, size, device=device))
        return True
    except (AssertionError, RuntimeError, ValueError):
        return False
    finally:
        net.train(was)
