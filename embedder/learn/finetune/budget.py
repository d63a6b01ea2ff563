"""A time budget turned into a plan: steps timed on this machine, then the epochs and image size that
fit."""

from __future__ import annotations

import time

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
                val_steps: int, probe_steps: int, head_epochs: int) -> BudgetPlan:
    """The largest crop size at which the probe and ``head_epochs + BUDGET_MIN_EPOCHS`` epochs fit in
    BUDGET_S, and as many epochs as fit there (at most BUDGET_MAX_EPOCHS). Step costs are measured
    at size FULL and scale with the pixel count."""
    sizes = budget_sizes(full)
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
