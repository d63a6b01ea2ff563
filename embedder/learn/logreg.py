"""Multinomial logistic regression in float32 torch: many L2-regularised problems on one feature
matrix, solved together.

A probe's choice of C fits the same model on several row subsets (the folds of a cross-validation,
or a split), with and without standardisation, at a path of C's. Each is scikit-learn's objective,
divided by C·n so that tolerances mean the same at every C::

    mean_i CE(x_i W'ᵀ + b, y_i) + ‖W‖² / (2·C·n),   W' = W / scale,  x centred by mean

Here they are P independent problems that share the rows: one pass over the features computes the
logits of all of them (``X @ [W'_1 … W'_P]ᵀ``: the matrix is read once, not P times), each row
weighted 0 or 1 per problem (its fold), standardisation folded into the weights (never a
standardised copy of the features). Each problem keeps its own L-BFGS state (history, step, stopping
test) in batched tensors — so a fold that has converged stops costing anything — and a backtracking
(Armijo) line search; the objective is strongly convex, so every step's curvature pair is valid.

The features are read in row chunks (``RowSource``): an in-memory float32 array (no copy: float32
is never widened to float64, as scikit-learn's solver does) or record batches streamed from a store
on each pass, so memory stays at the parameters, the curvature pairs and one block of rows (sized so
that its [rows, problems x classes] temporaries stay within ``WORK_BYTES``) whatever the number of rows.

Measured against scikit-learn's ``LogisticRegression`` (same objective, same gradient tolerance) in
``scripts/bench_probe.py``; agreement is tested in ``tests/test_probe.py``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

CHUNK_ROWS = 16_384  # rows per pass step: the working set is CHUNK_ROWS x (dim + problems x classes)


class RowSource(Protocol):
    """Float32 feature rows in a fixed order, as many times as asked (one pass per call)."""

    n: int
    dim: int

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 [rows, dim]) for consecutive chunks covering all ``n`` rows."""
        ...


@dataclass
class ArrayRows:
    """An in-memory float32 matrix, read in slices (views: nothing is copied)."""

    x: np.ndarray
    chunk: int = CHUNK_ROWS
    on_device: Any = field(default=None, repr=False)  # the matrix on an accelerator, once copied

    def __post_init__(self) -> None:
        if self.x.dtype != np.float32:
            raise TypeError(f"features must be float32, got {self.x.dtype}")  # a caller's bug, not input
        self.n, self.dim = self.x.shape

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        for s in range(0, self.n, self.chunk):
            yield s, self.x[s:s + self.chunk]


WORK_BYTES = 256 << 20  # a pass's per-block logits and gradients: [rows, problems x classes] float32, ~3 of them


def block_rows(outputs: int) -> int:
    """Rows per block of a pass, so that its [rows, outputs] temporaries stay within WORK_BYTES
    (1,000 classes x 10 problems: 2,184 rows, not CHUNK_ROWS)."""
    return int(np.clip(WORK_BYTES // (12 * max(outputs, 1)), 64, CHUNK_ROWS))


def device_chunks(rows: RowSource, device: Any, block: int = CHUNK_ROWS) -> Iterator[tuple[int, Any]]:
    """The rows as torch tensors on DEVICE in blocks of at most BLOCK rows: an in-memory matrix is
    copied to an accelerator once per solve (cached on the source), never once per pass; on the CPU
    the blocks are views."""
    torch = _torch()
    if device.type != "cpu" and isinstance(rows, ArrayRows):
        if rows.on_device is None or rows.on_device.device != device:
            rows.on_device = torch.as_tensor(rows.x, device=device)
        for s in range(0, rows.n, block):
            yield s, rows.on_device[s:s + block]
        return
    for start, chunk in rows.chunks():
        for s in range(0, len(chunk), block):
            yield start + s, torch.as_tensor(chunk[s:s + block]).to(device)


@dataclass(frozen=True)
class Problems:
    """P problems on one row source. ``fold[i]`` is row i's fold (-1: in no fold, trained on by
    every problem); problem p trains on the rows whose fold is not ``held_out[p]`` (-2: all rows)
    and, when ``weight`` is given, only where weight[i] is True (rows without a label, say)."""

    fold: np.ndarray  # int [n]
    held_out: np.ndarray  # int [P]
    mean: np.ndarray  # float32 [P, dim]
    scale: np.ndarray  # float32 [P, dim]
    C: np.ndarray  # float [P]

    @property
    def count(self) -> int:
        return len(self.held_out)

    def subset(self, idx: np.ndarray) -> Problems:
        return Problems(self.fold, self.held_out[idx], self.mean[idx], self.scale[idx], self.C[idx])

    def with_C(self, C: np.ndarray | float) -> Problems:
        return Problems(self.fold, self.held_out, self.mean, self.scale,
                        np.broadcast_to(np.asarray(C, np.float64), self.held_out.shape).copy())


@dataclass(frozen=True)
class SolverOptions:
    tol: float = 1e-4  # max |gradient| of the scaled objective (scikit-learn's gtol, same scale)
    max_iter: int = 1000
    tol_floor: float = 1e-6  # what float32 gradients resolve
    rtol: float = 0.5  # ... and at most this times the penalty's gradient, max |W| / (C n)
    history: int = 10
    device: str = "cpu"


@dataclass
class Solution:
    coef: np.ndarray  # float32 [P, classes, dim], in each problem's standardised space
    intercept: np.ndarray  # float32 [P, classes]
    iterations: np.ndarray  # int [P]
    converged: np.ndarray  # bool [P]: the gradient test met (not stopped by max_iter or float32's limit)
    passes: int  # passes over the rows (objective and gradient evaluations)
    history: History | None = None


def params_per_problem(n_classes: int) -> int:
    """Weight rows a problem solves for: one for two classes (scikit-learn's binary objective, whose
    penalty is on the one vector; a softmax pair would halve the effective C), else one per class."""
    return 1 if n_classes == 2 else n_classes


def pack(coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[P, classes, d] heads → the solver's parameters (two classes: the difference of the rows)."""
    if coef.shape[1] == 2:
        return (coef[:, 1:] - coef[:, :1]).astype(np.float32), (intercept[:, 1:] - intercept[:, :1]).astype(np.float32)
    return coef, intercept


def unpack(w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The solver's parameters → [P, classes, d] heads (one vector v: the softmax pair -v/2, v/2)."""
    if w.shape[1] == 1:
        return np.concatenate([-w / 2, w / 2], 1), np.concatenate([-b / 2, b / 2], 1)
    return w, b


def _torch() -> Any:
    import torch

    return torch


# multiply-adds per pass below which the solver runs on one thread: a pass of many small problems is
# many small tensor operations, and threads waiting on each other cost more than they share
# (sklearn digits, --standardize auto: 120 problems at once; 2 cores kept busy by two other processes:
# 300 images 13.2 s on 2 threads, 3.3 s on one; 1,300 images 32.5 s against 7.4 s; idle: 1.6 s either way)
SMALL_WORK = 300_000_000


@contextlib.contextmanager
def threads_for(work: float) -> Iterator[None]:
    """One torch thread for a small problem (threads that wait for each other cost more than the
    products when the cores are busy: measured 151.6 s against 4.2 s for a 100-image sweep with
    OpenBLAS), torch's own setting otherwise. torch's thread count is process-wide: it is restored
    on exit, and the probe does not run beside other torch work of the same process."""
    torch = _torch()
    before = torch.get_num_threads()
    if work >= SMALL_WORK or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Objective:
    """Loss and gradient of a subset of the problems, summed over the row chunks."""

    def __init__(self, rows: RowSource, y: np.ndarray, n_classes: int, problems: Problems, device: Any) -> None:
        torch = _torch()
        self.torch = torch
        self.rows, self.k, self.device = rows, n_classes, device
        self.y = torch.as_tensor(np.asarray(y, np.int64))
        self.fold = torch.as_tensor(np.asarray(problems.fold, np.int64))
        self.problems = problems
        self.held = torch.as_tensor(problems.held_out, device=device)
        self.mean = torch.as_tensor(problems.mean, device=device)
        self.scale = torch.as_tensor(problems.scale, device=device)
        # each problem's training rows: the labelled rows less its held-out fold's
        labelled = np.asarray(y) >= 0
        folds, per_fold = np.unique(np.asarray(problems.fold)[labelled], return_counts=True)
        out_of = {int(f): int(c) for f, c in zip(folds, per_fold)}
        n_rows = np.array([labelled.sum() - out_of.get(int(h), 0) for h in problems.held_out], np.float64)
        self.n_rows = torch.as_tensor(np.maximum(n_rows, 1), device=device)  # [P]
        self.lam = (1.0 / (torch.as_tensor(problems.C, dtype=torch.float64, device=device) * self.n_rows)
                    ).to(torch.float32)
        self.passes = 0

    def __call__(self, w: Any, b: Any, idx: Any) -> tuple[Any, Any, Any]:
        """(loss [p], grad_w [p, k, d], grad_b [p, k]) for problems ``idx`` at (w, b) [p, k, d], [p, k]."""
        torch = self.torch
        self.passes += 1
        p, k, d = w.shape
        scale, mean = self.scale[idx], self.mean[idx]
        v = w / scale[:, None, :]  # raw-space weights
        c = b - (v * mean[:, None, :]).sum(-1)  # raw-space intercepts
        vt = v.reshape(p * k, d).T.contiguous()
        held = self.held[idx]
        inv_n = (1.0 / self.n_rows[idx]).to(torch.float32)
        loss = torch.zeros(p, dtype=torch.float64, device=self.device)
        gv = torch.zeros(p * k, d, device=self.device)
        gc = torch.zeros(p, k, device=self.device)
        ar = torch.arange(p, device=self.device)
        for start, x in device_chunks(self.rows, self.device, block_rows(p * k)):
            m = x.shape[0]
            yy = self.y[start:start + m].to(self.device)
            ff = self.fold[start:start + m].to(self.device)
            wt = ((ff[:, None] != held[None, :]) & (yy[:, None] >= 0)).to(torch.float32) * inv_n  # [m, p]
            z = torch.addmm(c.reshape(-1), x, vt).view(m, p, k)
            if k == 1:  # binary: class 0's logit is 0 (scikit-learn's binary objective, one weight vector)
                z = torch.cat([torch.zeros_like(z), z], -1)
            top = z.amax(-1, keepdim=True)
            e = torch.exp(z - top)  # one exponential serves the loss and the gradient
            total = e.sum(-1)  # [m, p]
            rows_m = torch.arange(m, device=self.device)
            ysafe = yy.clamp(min=0)
            zy = z[rows_m, :, ysafe] - top[..., 0]  # [m, p]
            loss += ((torch.log(total) - zy) * wt).sum(0).to(torch.float64)
            e /= total[..., None]
            e[rows_m[:, None], ar[None, :], ysafe[:, None]] -= 1.0
            e *= wt[:, :, None]
            if k == 1:
                e = e[:, :, 1:].contiguous()
            gv.addmm_(e.view(m, p * k).T, x)
            gc += e.sum(0)
        gv3 = gv.view(p, k, d)
        gv3 -= gc[:, :, None] * mean[:, None, :]
        lam = self.lam[idx]
        gw = gv3 / scale[:, None, :] + lam[:, None, None] * w
        loss += (0.5 * lam.to(torch.float64) * (w.to(torch.float64) ** 2).sum((1, 2)))
        return loss, gw, gc


@dataclass
class Precond:
    """L-BFGS's initial inverse Hessian per problem: (c·Σ + λ·I)⁻¹ on each class's weights, Σ the
    covariance of the problem's (centred, scaled) features, c the curvature of the softmax at the
    start (1/classes; ¼ for two), λ its penalty. Features of CNNs have eigenvalues spread over many
    decades; this undoes the spread, the curvature pairs correct the rest (measured on Fashion-MNIST:
    docs/benchmarks.md). ``U``/``e``: Σ's eigenvectors and values per family, ``family``: per problem."""

    U: Any  # [G, d, d]
    e: Any  # [G, d]
    family: np.ndarray  # [P] index into G
    c: float

    tail: Any = None  # [G]: the mean of the eigenvalues past the kept ones (U keeps the largest)

    def apply(self, q: Any, idx: np.ndarray, lam: Any, k: int, d: int) -> Any:
        """H₀·q for the problems IDX (rows of q): the kept eigen-directions scaled one by one, the
        rest of the space by the tail's mean eigenvalue (a low-rank-plus-scalar inverse)."""
        torch = _torch()
        out = torch.empty_like(q)
        fam = self.family[idx]
        for g in np.unique(fam):
            sel = torch.as_tensor(np.flatnonzero(fam == g), device=q.device)
            qw = q[sel, :k * d].reshape(-1, d)  # [a·k, d]
            lam_r = lam[sel].repeat_interleave(k)[:, None]
            inv_tail = 1.0 / (self.c * self.tail[g] + lam_r)
            coef = qw @ self.U[g]  # [a·k, r] in the kept eigenbasis
            res = qw * inv_tail + (coef * (1.0 / (self.c * self.e[g][None, :] + lam_r) - inv_tail)) @ self.U[g].T
            out[sel, :k * d] = res.reshape(len(sel), k * d)
            out[sel, k * d:] = q[sel, k * d:] / self.c
        return out


def sample_rows(rows: RowSource, mean: np.ndarray, limit: int = 5_000) -> np.ndarray:
    """About LIMIT rows taken evenly across all of them (stores are often sorted by class: the first
    rows would be a few classes' covariance), centred, as one float32 matrix: a preconditioner's
    estimate of the covariance needs no more, whatever the number of rows. One pass."""
    step = max(1, -(-rows.n // limit))
    parts: list[np.ndarray] = []
    for start, chunk in rows.chunks():
        first = (-start) % step  # the first row of this chunk whose index is a multiple of STEP
        parts.append((chunk[first::step] - mean).astype(np.float32))
    return np.concatenate(parts) if parts else np.zeros((0, rows.dim), np.float32)


PRECOND_RANK = 128  # eigen-directions a preconditioner keeps one by one


def eig_top(sample: np.ndarray, scale: np.ndarray | None = None,
            rank: int = PRECOND_RANK) -> tuple[np.ndarray, np.ndarray, float]:
    """(largest RANK eigenvectors [d, r], their values [r], the mean of the other values) of the
    covariance of SAMPLE's rows (divided by SCALE): a randomised SVD of the sample (torch's
    ``svd_lowrank``), or the exact eigendecomposition where the dimension is small."""
    torch = _torch()
    m, d = sample.shape
    xs = torch.as_tensor(sample if scale is None else (sample / scale).astype(np.float32))
    total = float((xs * xs).sum()) / max(m, 1)  # the trace: the sum of every eigenvalue
    if d <= 2 * rank or m <= 2 * rank:
        e, U = torch.linalg.eigh(xs.T @ xs / max(m, 1))
        e = e.clamp(min=0)
        r = min(rank, d)
        tail = float(e[:-r].mean()) if r < d else 0.0
        return U[:, -r:].numpy(), e[-r:].numpy(), tail
    with torch.random.fork_rng(devices=[]):  # seeded (the same path on every run), the caller's RNG untouched
        torch.manual_seed(0)
        _u, sv, V = torch.svd_lowrank(xs, q=rank + 10, niter=2)
    e = (sv[:rank] ** 2) / m
    tail = max(total - float(e.sum()), 0.0) / (d - rank)
    return V[:, :rank].contiguous().numpy(), e.numpy(), tail


def precond_from(eigs: list[tuple[np.ndarray, np.ndarray, float]], family: np.ndarray, n_classes: int,
                 device: Any) -> Precond:
    """A ``Precond`` from each family's ``eig_top``."""
    torch = _torch()
    dev = torch.device(device)
    c = 0.25 if n_classes == 2 else 1.0 / n_classes
    return Precond(torch.as_tensor(np.stack([U for U, _e, _t in eigs]), device=dev),
                   torch.as_tensor(np.stack([e for _U, e, _t in eigs]), device=dev),
                   np.asarray(family), c, torch.as_tensor([t for _U, _e, t in eigs], device=dev))


@dataclass
class History:
    """Each problem's L-BFGS curvature pairs (oldest first), kept between solves on a C path: a pair
    measured at penalty λ is exact at λ' once ``(λ' - λ)·s`` is added to its ``y`` (the penalty's
    Hessian is λ·I on the weights), so a warm start at the next C starts with a good Hessian model."""

    S: Any  # [m, P, D]
    Y: Any  # [m, P, D]
    lam: Any  # [P], the λ they were measured at

    def take(self, idx: Any) -> History:
        return History(self.S[:, idx], self.Y[:, idx], self.lam[idx])

    @staticmethod
    def cat(parts: list[History]) -> History:
        torch = _torch()
        return History(torch.cat([h.S for h in parts], 1), torch.cat([h.Y for h in parts], 1),
                       torch.cat([h.lam for h in parts]))

    def tile(self, n: int) -> History:
        return History(self.S.repeat(1, n, 1), self.Y.repeat(1, n, 1), self.lam.repeat(n))


def solve(rows: RowSource, y: np.ndarray, n_classes: int, problems: Problems,
          init: tuple[np.ndarray, np.ndarray] | None = None, options: SolverOptions = SolverOptions(),
          history: History | None = None, precond: Precond | None = None) -> Solution:
    """Minimise every problem's objective with a per-problem L-BFGS, all problems evaluated in one
    pass over the rows. ``init``: (coef [P, k, d], intercept [P, k]) to warm-start from;
    ``history``: the curvature pairs of the solve that gave it (same problems, another C)."""
    torch = _torch()
    device = torch.device(options.device)
    P, k, d = problems.count, params_per_problem(n_classes), rows.dim
    kd = k * d
    obj = _Objective(rows, y, n_classes, problems, device)
    if init is not None:
        w0, b0 = pack(np.asarray(init[0], np.float32), np.asarray(init[1], np.float32))
        w = torch.as_tensor(w0, device=device).clone()
        b = torch.as_tensor(b0, device=device).clone()
    else:
        w = torch.zeros(P, k, d, device=device)
        b = torch.zeros(P, k, device=device)
    D = kd + k
    m_hist = options.history
    lam_all = obj.lam
    if history is not None and history.S.shape[0] == m_hist and history.S.shape[1:] == (P, D):
        S, Yh = history.S.clone(), history.Y.clone()
        Yh[:, :, :kd] += (lam_all - history.lam)[None, :, None] * S[:, :, :kd]
        sy = (S * Yh).sum(2)
        rho = torch.where(sy > 1e-10, 1.0 / sy.clamp(min=1e-30), torch.zeros_like(sy))
        filled = m_hist
    else:
        S = torch.zeros(m_hist, P, D, device=device)
        Yh = torch.zeros(m_hist, P, D, device=device)
        rho = torch.zeros(m_hist, P, device=device)
        filled = 0
    iters = np.zeros(P, np.int64)
    restarts = np.zeros(P, np.int64)  # line searches that failed from a quasi-Newton direction
    f, gw, gb = obj(w, b, torch.arange(P, device=device))
    x = torch.cat([w.reshape(P, -1), b], 1)  # [P, D]
    g = torch.cat([gw.reshape(P, -1), gb], 1)

    def limit(xs: Any, lam: Any) -> Any:
        # |gradient| ≤ tol, and — since a warm start at a larger C sits where the gradient is already
        # small — ≤ rtol × the penalty's own gradient, so the weights move before a fit counts as done
        return torch.clamp(torch.minimum(torch.full_like(lam, options.tol),
                                         options.rtol * lam * xs[:, :kd].abs().amax(1)), min=options.tol_floor)

    # The active problems' pairs live in contiguous tensors with one circular slot (S[slot - 1] the
    # newest): a problem that finishes is dropped from them once, its pairs kept for the caller.
    out_S, out_Y = S.clone(), Yh.clone()  # every problem's pairs, newest last, when it stops
    slot = 0
    act = np.flatnonzero(~(g.abs().amax(1) <= limit(x, lam_all)).cpu().numpy())

    def retire(keep: np.ndarray) -> None:
        nonlocal S, Yh, rho, act
        gone = act[~keep]
        if len(gone):
            order = [(slot + j) % m_hist for j in range(m_hist)]  # oldest first
            idx = torch.as_tensor(np.flatnonzero(~keep), device=device)
            out_S[:, torch.as_tensor(gone, device=device)] = S[order][:, idx]
            out_Y[:, torch.as_tensor(gone, device=device)] = Yh[order][:, idx]
            kidx = torch.as_tensor(np.flatnonzero(keep), device=device)
            S, Yh, rho = S[:, kidx], Yh[:, kidx], rho[:, kidx]
            act = act[keep]

    if len(act) < P:  # converged at the start: retire them from the full-size pair tensors
        keep0 = np.zeros(P, bool)
        keep0[act] = True
        act = np.arange(P)
        retire(keep0)
    for _ in range(options.max_iter):
        if not len(act):
            break
        active = torch.as_tensor(act, device=device)
        ga = g[active]
        q = ga.clone()
        order = [(slot - 1 - j) % m_hist for j in range(filled)]  # newest first
        alpha = {}
        for i in order:  # two-loop recursion, per problem (rho = 0: an empty or skipped pair)
            alpha[i] = rho[i] * (S[i] * q).sum(1)
            q -= alpha[i][:, None] * Yh[i]
        lam_a = lam_all[active]
        if precond is not None:
            r = precond.apply(q, act, lam_a, k, d)
            gam = torch.ones_like(lam_a)
            if filled:  # scaled by the newest pair, sᵀy / yᵀH₀y: where the softmax is confident the
                # curvature is far below c·Σ, and a step of H₀ alone would be too short
                nw = (slot - 1) % m_hist
                hy = precond.apply(Yh[nw], act, lam_a, k, d)
                gam = torch.where(rho[nw] > 0, (1.0 / rho[nw].clamp(min=1e-30)) / (Yh[nw] * hy).sum(1).clamp(min=1e-30),
                                  gam)
                r = r * gam[:, None]
        else:
            gam = 1.0 / ga.norm(dim=1).clamp(min=1e-12)
            if filled:
                nw = (slot - 1) % m_hist
                gam = torch.where(rho[nw] > 0, (1.0 / rho[nw].clamp(min=1e-30)) / (Yh[nw] ** 2).sum(1).clamp(min=1e-30),
                                  gam)
            r = q * gam[:, None]
        for i in reversed(order):
            beta = rho[i] * (Yh[i] * r).sum(1)
            r += S[i] * (alpha[i] - beta)[:, None]
        direction = -r
        slope = (ga * direction).sum(1)
        bad = slope >= 0  # not a descent direction (numerical): the scaled gradient instead
        if bool(bad.any()):
            direction[bad] = -ga[bad] * gam[bad, None]
            slope = (ga * direction).sum(1)
        # backtracking (Armijo) line search, per problem; only the problems still searching are evaluated
        A = len(act)
        t = torch.ones(A, device=device)
        f0, xa = f[active], x[active]
        todo = torch.arange(A, device=device)
        new_x, new_f, new_g = xa.clone(), f0.clone(), ga.clone()
        failed = torch.zeros(A, dtype=torch.bool, device=device)
        for attempt in range(16):
            trial = xa[todo] + t[todo, None] * direction[todo]
            ft, gwt, gbt = obj(trial[:, :kd].reshape(-1, k, d), trial[:, kd:], active[todo])
            gt = torch.cat([gwt.reshape(len(todo), -1), gbt], 1)
            f0t, sl = f0[todo], slope[todo]
            ok = ft <= f0t + 1e-4 * t[todo].to(torch.float64) * sl.to(torch.float64)  # Armijo
            # near the line's minimum a decrease is below float32's resolution of the loss: accept a
            # step that keeps the loss within that resolution and has not overshot (Hager and
            # Zhang's approximate Wolfe condition)
            ok |= (ft <= f0t + 1e-6 * f0t.abs()) & ((gt * direction[todo]).sum(1) <= -(1 - 2e-4) * sl)
            acc = todo[ok]
            new_x[acc] = trial[ok]
            new_f[acc] = ft[ok]
            new_g[acc] = gt[ok]
            todo = todo[~ok]
            if len(todo) == 0:
                break
            t[todo] *= 0.25 if attempt == 0 else 0.5
        else:
            failed[todo] = True  # no decrease found: as converged as float32 allows
        # a search that found no decrease from a quasi-Newton direction starts again from the
        # gradient with no pairs; one that fails from the gradient is as converged as float32 allows
        had_pairs = (rho != 0).any(0) & torch.as_tensor(restarts[act] < 2, device=device)
        restart = failed & had_pairs
        if bool(restart.any()):
            rho[:, restart] = 0.0
            restarts[act[restart.cpu().numpy()]] += 1
            failed = failed & ~had_pairs
        s_new, y_new = new_x - xa, new_g - ga
        sy = (s_new * y_new).sum(1)
        good = (sy > 1e-10) & ~failed & ~restart
        S[slot] = torch.where(good[:, None], s_new, torch.zeros_like(s_new))
        Yh[slot] = torch.where(good[:, None], y_new, torch.zeros_like(y_new))
        rho[slot] = torch.where(good, 1.0 / sy.clamp(min=1e-30), torch.zeros_like(sy))
        slot = (slot + 1) % m_hist
        filled = min(filled + 1, m_hist)
        x[active], f[active], g[active] = new_x, new_f, new_g
        iters[act] += 1
        rel = (f0 - new_f).abs() / torch.maximum(f0.abs(), new_f.abs()).clamp(min=1.0)
        done = ((new_g.abs().amax(1) <= limit(new_x, lam_all[active])) | failed
                | ((rel <= 1e-10) & ~restart)).cpu().numpy()
        if done.any():
            retire(~done)
    retire(np.zeros(len(act), bool))  # those stopped by max_iter
    w = x[:, :kd].reshape(P, k, d)
    b = x[:, kd:]
    met = (g.abs().amax(1) <= limit(x, lam_all)).cpu().numpy()
    coef, icpt = unpack(w.cpu().numpy(), b.cpu().numpy())
    return Solution(coef, icpt, iters, met, obj.passes, History(out_S, out_Y, lam_all.clone()))


def predict_held_out(rows: RowSource, y: np.ndarray, problems: Problems, coef: np.ndarray,
                     intercept: np.ndarray, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Each problem's held-out predictions in one pass: (correct [P], log-loss sum [P]) over the
    rows of fold ``held_out[p]`` with a label (y >= 0)."""
    torch = _torch()
    dev = torch.device(device)
    P, k, d = coef.shape
    w = torch.as_tensor(coef, device=dev)
    b = torch.as_tensor(intercept, device=dev)
    scale = torch.as_tensor(problems.scale, device=dev)
    mean = torch.as_tensor(problems.mean, device=dev)
    v = w / scale[:, None, :]
    c = b - (v * mean[:, None, :]).sum(-1)
    vt = v.reshape(P * k, d).T.contiguous()
    held = torch.as_tensor(problems.held_out, device=dev)
    yt = torch.as_tensor(np.asarray(y, np.int64))
    ft = torch.as_tensor(np.asarray(problems.fold, np.int64))
    correct = torch.zeros(P, dtype=torch.float64)
    loss = torch.zeros(P, dtype=torch.float64)
    for start, x in device_chunks(rows, dev, block_rows(P * k)):
        m = x.shape[0]
        yy = yt[start:start + m].to(dev)
        ff = ft[start:start + m].to(dev)
        mask = (ff[:, None] == held[None, :]) & (yy[:, None] >= 0)  # [m, P]
        if not bool(mask.any()):
            continue
        z = torch.addmm(c.reshape(-1), x, vt).view(m, P, k)
        logp = torch.log_softmax(z, -1)
        ys = yy.clamp(min=0)
        lp = logp[torch.arange(m, device=dev), :, ys]  # [m, P]
        hit = (z.argmax(-1) == ys[:, None])
        correct += (hit & mask).sum(0).to(torch.float64).cpu()
        loss += (-lp.clamp(min=math.log(1e-12)) * mask).sum(0).to(torch.float64).cpu()
    return correct.numpy(), loss.numpy()


# ---- the space a family of problems is solved in --------------------------------------------
@dataclass
class Space:
    """Where problems are solved. ``basis is None``: the rows themselves, each problem centred and
    scaled by its own ``Problems.mean/scale``. Otherwise the rows' coordinates in the span of the
    centred (and scaled) rows — exact for every problem on a subset of them, since the penalty is
    isotropic and the part of W outside that span changes no logit — with ``full = reduced @ basisᵀ``
    in the space of ``(x - center) / scale``; problems there have mean 0 and scale 1."""

    rows: RowSource
    basis: np.ndarray | None = None  # [dim, r]
    center: np.ndarray | None = None  # [dim]
    scale: np.ndarray | None = None  # [dim]

    @property
    def reduced(self) -> bool:
        return self.basis is not None

    def to_raw(self, coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray,
               scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A problem's solution (its own space; MEAN/SCALE: its standardisation) as raw-feature
        weights and intercepts: logits = x @ coefᵀ + intercept."""
        if self.basis is not None:
            coef = coef @ self.basis.T
            mean, scale = self.center, self.scale  # type: ignore[assignment]
        v = coef / scale
        return v.astype(np.float32), (intercept - v @ mean).astype(np.float32)

    def from_raw(self, v: np.ndarray, c: np.ndarray, mean: np.ndarray,
                 scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The inverse of ``to_raw`` (a warm start: a reduced space keeps the part inside its span)."""
        if self.basis is not None:
            mean, scale = self.center, self.scale  # type: ignore[assignment]
        w = v * scale
        b = c + v @ mean
        if self.basis is not None:
            w = w @ self.basis
        return w.astype(np.float32), b.astype(np.float32)


def reduced_space(x: np.ndarray, standardize: bool) -> Space:
    """The span of the centred (and, with STANDARDIZE, scaled) rows of an in-memory matrix with fewer
    rows than dimensions, from the eigendecomposition of their Gram matrix (float64: n x n)."""
    center = x.mean(0, dtype=np.float64)
    scale = x.std(0, dtype=np.float64) if standardize else np.ones(x.shape[1])
    scale[scale < 1e-8] = 1.0
    xs = (x - center) / scale  # float64 [n, dim]: n < dim, so at most dim² numbers
    evals, u = np.linalg.eigh(xs @ xs.T)
    keep = evals > max(float(evals[-1]), 1e-30) * 1e-9
    evals, u = evals[keep], u[:, keep]
    root = np.sqrt(evals)
    coords = (u * root).astype(np.float32)  # [n, r]
    basis = (xs.T @ u) / root  # [dim, r], orthonormal columns
    return Space(ArrayRows(np.ascontiguousarray(coords)), basis, center, scale)


def fold_moments(rows: RowSource, y: np.ndarray, fold: np.ndarray,
                 folds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per fold of FOLDS (fold ids >= -1): labelled-row counts, and sums and sums of squares of the
    rows less a shift (the first chunk's mean, so the variance does not cancel), float64; one pass.
    Returns (count [F], s1 [F, dim], s2 [F, dim], shift [dim])."""
    F = len(folds)
    count = np.zeros(F)
    s1 = np.zeros((F, rows.dim))
    s2 = np.zeros((F, rows.dim))
    shift: np.ndarray | None = None
    lut = np.full(int(max(fold.max(initial=-1), folds.max(initial=-1))) + 2, -1, np.int64)
    lut[np.asarray(folds) + 1] = np.arange(F)
    for start, chunk in rows.chunks():
        if shift is None:
            shift = chunk.mean(0, dtype=np.float64).astype(np.float32)
        for s in range(0, len(chunk), 2048):  # blocks of 2,048 rows: the temporaries stay small
            block = chunk[s:s + 2048]
            m = len(block)
            at = start + s
            idx = lut[fold[at:at + m] + 1]
            ok = (y[at:at + m] >= 0) & (idx >= 0)
            dev = block - shift
            onehot = np.zeros((m, F), np.float32)
            onehot[np.flatnonzero(ok), idx[ok]] = 1.0
            count += onehot.sum(0)
            s1 += onehot.T @ dev
            s2 += onehot.T.astype(np.float64) @ np.square(dev, dtype=np.float64)  # float64: no overflow
    return count, s1, s2, (np.zeros(rows.dim, np.float32) if shift is None else shift)


def moments_scaler(count: float, s1: np.ndarray, s2: np.ndarray,
                   shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of the rows that ``fold_moments`` summed; a constant dimension keeps scale 1."""
    n = max(count, 1.0)
    dev = s1 / n
    scale = np.sqrt(np.maximum(s2 / n - dev ** 2, 0.0))
    scale[scale < 1e-8] = 1.0
    return (dev + shift).astype(np.float32), scale.astype(np.float32)


# ---- tiny problems: Newton's method -----------------------------------------------------------
NEWTON_WORK = 3e7  # problems x rows x (weight rows x coordinates)² below which Newton's method solves them


def newton_work(problems: int, rows: int, n_classes: int, coords: int) -> float:
    """Multiply-adds of one Newton step's Hessians (coords: per problem, with the intercept's)."""
    return float(problems) * rows * (params_per_problem(n_classes) * coords) ** 2


NEWTON_MAX_ITER = 100


def newton(X: np.ndarray, y: np.ndarray, n_classes: int, train: np.ndarray, lam: np.ndarray,
           tol: float = 1e-6, max_iter: int = NEWTON_MAX_ITER) -> tuple[np.ndarray, np.ndarray]:
    """Newton's method on P small problems at once, in float64: X [P, n, r] (each problem's own
    coordinates of the rows; the last column all ones: the intercept, unpenalised), y [n] class
    indices, train [P, n] the rows each problem trains on, lam [P] = 1 / (C · its rows). Minimises
    the same objective as ``solve``. Where the problem is a few rows in a few coordinates (a handful of
    labelled images), a step of L-BFGS costs its fixed overhead, not arithmetic, and L-BFGS needs tens
    of them; Newton needs a few. Returns (theta [P, k, r], iterations [P]); k = 1 for two classes."""
    P, n, r = X.shape
    k = params_per_problem(n_classes)
    w = train / np.maximum(train.sum(1, keepdims=True), 1)  # [P, n]: the mean over its training rows
    Y = (y == 1).astype(np.float64)[:, None] if k == 1 else np.eye(n_classes)[y]  # [n, k]
    pen = np.ones(r)
    pen[-1] = 0.0
    theta = np.zeros((P, k, r))
    iters = np.zeros(P, np.int64)

    def value(th: np.ndarray, idx: np.ndarray, with_grad: bool) -> tuple[np.ndarray, ...]:
        z = np.einsum("pnr,pkr->pnk", X[idx], th)
        wi = w[idx]
        if k == 1:
            loss = (wi * (np.logaddexp(0.0, z[..., 0]) - Y[None, :, 0] * z[..., 0])).sum(1)
        else:
            top = z.max(-1, keepdims=True)
            lse = top[..., 0] + np.log(np.exp(z - top).sum(-1))
            loss = (wi * (lse - (z * Y[None]).sum(-1))).sum(1)
        loss = loss + 0.5 * lam[idx] * (pen * th ** 2).sum((1, 2))
        if not with_grad:
            return (loss,)
        if k == 1:
            prob = 1.0 / (1.0 + np.exp(-z))  # [p, n, 1]
            hn = (wi * (prob * (1 - prob))[..., 0])[..., None, None]  # [p, n, 1, 1]
        else:
            prob = np.exp(z - lse[..., None])
            hn = wi[..., None, None] * (prob[..., :, None] * np.eye(k) - prob[..., :, None] * prob[..., None, :])
        resid = (prob - Y[None]) * wi[..., None]
        grad = np.einsum("pnk,pnr->pkr", resid, X[idx]) + lam[idx, None, None] * pen * th
        xx = np.einsum("pnr,pns->pnrs", X[idx], X[idx])
        hess = np.einsum("pnkl,pnrs->pkrls", hn, xx).reshape(len(idx), k * r, k * r)
        ridge = np.tile(pen, k) * lam[idx, None] + 1e-10  # the intercepts' tiny ridge: a null direction
        hess[:, np.arange(k * r), np.arange(k * r)] += ridge
        return loss, grad, hess

    active = np.arange(P)
    f = value(theta, active, False)[0]
    for _ in range(max_iter):
        _, grad, hess = value(theta[active], active, True)
        done = np.abs(grad).reshape(len(active), -1).max(1) <= tol
        active, grad, hess = active[~done], grad[~done], hess[~done]
        if not len(active):
            break
        step = -np.linalg.solve(hess, grad.reshape(len(active), -1)[..., None])[..., 0].reshape(len(active), k, r)
        slope = (grad * step).sum((1, 2))
        t = np.ones(len(active))
        todo = np.arange(len(active))
        for _ls in range(40):
            trial = theta[active[todo]] + t[todo, None, None] * step[todo]
            ft = value(trial, active[todo], False)[0]
            ok = ft <= f[active[todo]] + 1e-4 * t[todo] * slope[todo] + 1e-12 * np.abs(f[active[todo]])
            theta[active[todo[ok]]] = trial[ok]
            f[active[todo[ok]]] = ft[ok]
            todo = todo[~ok]
            if not len(todo):
                break
            t[todo] *= 0.5
        iters[active] += 1
        if len(todo):  # no decrease at all: as converged as float64 allows
            keep = np.ones(len(active), bool)
            keep[todo] = False
            active = active[keep]
    return theta, iters
