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

A problem whose full step fails tries its next :data:`HALVINGS` steps (1/2 .. 1/256) in one
evaluation and takes the first acceptable one: the step, point and objective one halving at a
time would reach, in a fraction of the evaluations (about half of a fit's iterations backtrack,
three halvings on average, and an evaluation of a few rows costs about its fixed overhead).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

FG = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
HALVINGS = 8  # backtracking steps tried per evaluation once a full step fails


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

    The problems still running are kept compacted (their rows ``idx`` of the batch, in order),
    so an iteration copies no rows of finished problems, and one where every full step is
    accepted, the usual case, updates the state in place: the same arithmetic per problem as
    indexing the whole batch every time, in fewer calls (most iterations of a fit are a few
    long-running problems of a small batch).
    """
    x = np.array(x0, dtype=float)
    B, P = x.shape
    f, g = fg(x, np.arange(B))
    f = np.where(np.isfinite(f), f, np.inf)
    iters = np.zeros(B, int)
    g = np.where(np.isfinite(g), g, 0.0)
    eye = np.eye(P)
    # the running problems' state: rows idx of the batch
    idx = np.flatnonzero(np.isfinite(f) & np.isfinite(g).all(1))
    xa, fa, ga, na = x[idx], f[idx], g[idx], iters[idx]
    H = np.broadcast_to(eye, (idx.size, P, P)).copy()
    scaled = np.zeros(idx.size, bool)
    for _ in range(max_iter):
        n = idx.size
        if n == 0:
            break
        d = -np.einsum("bij,bj->bi", H, ga)
        slope = (d * ga).sum(1)
        bad = ~(slope < 0)  # not a descent direction: restart from steepest descent
        if bad.any():
            H[bad] = eye
            d[bad] = -ga[bad]
            slope[bad] = -(ga[bad] ** 2).sum(1)
        # Armijo backtracking, all problems at once: the full step first
        t = np.ones(n)
        f_new, g_new = fg(xa + t[:, None] * d, idx)
        ok = np.isfinite(f_new) & np.isfinite(g_new).all(1)
        ok &= f_new <= fa + 1e-4 * t * slope
        failed = np.flatnonzero(~ok)
        if failed.size:  # the next halvings, HALVINGS at a time, in one evaluation
            f_new, g_new = np.where(ok, f_new, np.inf), np.where(ok[:, None], g_new, 0.0)
            for k0 in range(1, 41, HALVINGS):
                k = np.arange(k0, min(k0 + HALVINGS, 41))  # halvings k0.., at most 40 in all
                tk = np.tile(np.ldexp(1.0, -k), failed.size)  # 2^-k: the halvings' own steps
                rep = np.repeat(failed, k.size)
                ft, gt = fg(xa[rep] + tk[:, None] * d[rep], idx[rep])
                ok = np.isfinite(ft) & np.isfinite(gt).all(1)
                ok &= ft <= fa[rep] + 1e-4 * tk * slope[rep]
                ok = ok.reshape(failed.size, k.size)
                hit = ok.any(1)
                j = ok.argmax(1)[hit]  # the first acceptable step of each
                at = np.flatnonzero(hit) * k.size + j
                moved = failed[hit]
                t[moved], f_new[moved], g_new[moved] = tk[at], ft[at], gt[at]
                failed = failed[~hit]
                if failed.size == 0:
                    break
        # the problems that moved (all, or all but those whose line search failed: they stop)
        mv: slice | np.ndarray = slice(None)
        if failed.size:
            mv = np.ones(n, bool)
            mv[failed] = False
        s = t[mv, None] * d[mv]
        y = g_new[mv] - ga[mv]
        sy = (s * y).sum(1)
        f_old = fa[mv].copy()  # (a view when every problem moved)
        decrease = f_old - f_new[mv]
        xa[mv] += s
        fa[mv], ga[mv] = f_new[mv], g_new[mv]
        na[mv] += 1
        # the BFGS update of the inverse Hessian, where the curvature condition holds
        upd = sy > 1e-12 * np.sqrt((s * s).sum(1) * (y * y).sum(1))
        rows = np.arange(n)[mv]  # compact rows of the moved problems
        first = upd & ~scaled[rows]
        if first.any():  # Nocedal & Wright eq. 6.20: scale H0 before the first update
            fi = rows[first]
            gamma = sy[first] / (y[first] ** 2).sum(1)
            H[fi] = eye * gamma[:, None, None]
            scaled[fi] = True
        if upd.any():
            ui, su, yu, syu = rows[upd], s[upd], y[upd], sy[upd]
            rho = 1.0 / syu
            Hy = np.einsum("bij,bj->bi", H[ui], yu)
            yHy = (yu * Hy).sum(1)
            H[ui] += (
                (1 + rho * yHy)[:, None, None] * rho[:, None, None] * su[:, :, None] * su[:, None, :]
                - rho[:, None, None] * (Hy[:, :, None] * su[:, None, :] + su[:, :, None] * Hy[:, None, :])
            )  # fmt: skip
        # scipy L-BFGS-B's tests: a small relative decrease, or a small gradient
        scale = np.maximum(np.maximum(np.abs(f_old), np.abs(fa[mv])), 1.0)
        done = (decrease <= ftol * scale) | (np.abs(ga[mv]).max(1) <= gtol)
        if done.any() or failed.size:
            stop = np.zeros(n, bool)
            stop[rows[done]] = True
            stop[failed] = True
            out = idx[stop]
            x[out], f[out], iters[out] = xa[stop], fa[stop], na[stop]
            keep = ~stop
            idx, xa, fa, ga, na = idx[keep], xa[keep], fa[keep], ga[keep], na[keep]
            H, scaled = H[keep], scaled[keep]
    x[idx], f[idx], iters[idx] = xa, fa, na
    return x, f, iters
