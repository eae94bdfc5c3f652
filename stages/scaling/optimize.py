"""Many small smooth minimisations at once: a batched BFGS with a backtracking line search.

A scaling-law fit is hundreds of independent 4-5 parameter problems: the starts of a multi-start
search, the resamples of a bootstrap, the folds of an extrapolation check. Solving them one
scipy call at a time cost ~1 ms of Python per iteration each; here every problem of a batch
advances together, one vectorised objective-and-gradient evaluation per iteration for all of
them (``fg(x, rows)`` evaluates problems ``rows`` at points ``x``), each with its own inverse
Hessian (P x P), step and convergence test. Problems stop independently; a problem whose
objective is not finite at its start is returned as is (objective inf).

BFGS (Nocedal & Wright, Alg. 6.1) with H0 scaled by y's/y'y after the first step, an Armijo
backtracking line search (c1 = 1e-4, halving), and a restart (H = I) when the direction is not
one of descent. It stops a problem as scipy's L-BFGS-B does, when the decrease over an
iteration is below ``ftol`` x max(|f|, 1) or the gradient's largest entry is below ``gtol``,
and when a line search fails (no decrease at a step of 2^-40: a kink or the floating-point
floor).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

FG = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def minimize_batched(
    fg: FG,
    x0: np.ndarray,
    max_iter: int = 1000,
    ftol: float = 1e-10,
    gtol: float = 1e-9,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise B problems from ``x0`` (B, P); returns (x (B, P), f (B,), iterations (B,)).

    ``fg(x, rows)`` returns the objectives (len(rows),) and gradients (len(rows), P) of problems
    ``rows`` (indices into the batch) at points ``x`` (len(rows), P).
    """
    x = np.array(x0, dtype=float)
    B, P = x.shape
    rows = np.arange(B)
    f, g = fg(x, rows)
    f = np.where(np.isfinite(f), f, np.inf)
    H = np.broadcast_to(np.eye(P), (B, P, P)).copy()
    scaled = np.zeros(B, bool)
    iters = np.zeros(B, int)
    active = np.isfinite(f) & np.isfinite(g).all(1)
    g = np.where(np.isfinite(g), g, 0.0)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        d = -np.einsum("bij,bj->bi", H[idx], g[idx])
        slope = (d * g[idx]).sum(1)
        bad = ~(slope < 0)  # not a descent direction: restart from steepest descent
        if bad.any():
            H[idx[bad]] = np.eye(P)
            d[bad] = -g[idx[bad]]
            slope[bad] = -(g[idx[bad]] ** 2).sum(1)
        t = np.ones(idx.size)
        f_new = np.full(idx.size, np.inf)
        g_new = np.zeros((idx.size, P))
        todo = np.arange(idx.size)
        for _halving in range(41):  # Armijo backtracking, all problems at once
            xt = x[idx[todo]] + t[todo, None] * d[todo]
            ft, gt = fg(xt, idx[todo])
            ok = np.isfinite(ft) & np.isfinite(gt).all(1)
            ok &= ft <= f[idx[todo]] + 1e-4 * t[todo] * slope[todo]
            f_new[todo[ok]], g_new[todo[ok]] = ft[ok], gt[ok]
            todo = todo[~ok]
            if todo.size == 0:
                break
            t[todo] *= 0.5
        failed = np.zeros(idx.size, bool)  # no acceptable step: stop there
        failed[todo] = True
        moved = ~failed
        mi = idx[moved]
        s = t[moved, None] * d[moved]
        y = g_new[moved] - g[mi]
        sy = (s * y).sum(1)
        decrease = f[mi] - f_new[moved]
        x[mi] += s
        f_old = f[mi]
        f[mi], g[mi] = f_new[moved], g_new[moved]
        iters[mi] += 1
        # the BFGS update of the inverse Hessian, where the curvature condition holds
        upd = sy > 1e-12 * np.sqrt((s * s).sum(1) * (y * y).sum(1))
        first = upd & ~scaled[mi]
        if first.any():  # Nocedal & Wright eq. 6.20: scale H0 before the first update
            fi = mi[first]
            gamma = sy[first] / (y[first] ** 2).sum(1)
            H[fi] = np.eye(P) * gamma[:, None, None]
            scaled[fi] = True
        if upd.any():
            ui, su, yu, syu = mi[upd], s[upd], y[upd], sy[upd]
            rho = 1.0 / syu
            Hy = np.einsum("bij,bj->bi", H[ui], yu)
            yHy = (yu * Hy).sum(1)
            H[ui] += (
                (1 + rho * yHy)[:, None, None] * rho[:, None, None] * su[:, :, None] * su[:, None, :]
                - rho[:, None, None] * (Hy[:, :, None] * su[:, None, :] + su[:, :, None] * Hy[:, None, :])
            )  # fmt: skip
        # scipy L-BFGS-B's tests: a small relative decrease, or a small gradient
        scale = np.maximum(np.maximum(np.abs(f_old), np.abs(f[mi])), 1.0)
        done = (decrease <= ftol * scale) | (np.abs(g[mi]).max(1) <= gtol)
        active[mi[done]] = False
        active[idx[failed]] = False
    return x, f, iters
