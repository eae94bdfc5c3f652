"""The sparsity-aware MoE law (stages/scaling/sparsity.py) and the fit of a table swept over
expert counts.

A study drawn from a known L(N, D, S) with 0.5% multiplicative noise: the fit predicts the runs,
the top-compute runs and each expert count it did not see to about the noise (1.5% allowed: a
10-parameter law from 64 runs), and the effect of more experts within 1 point of the truth and
inside (a point beyond) its bootstrap interval. The ten parameters themselves are not asserted:
the two N terms and E + C trade off, which is why the report states predictions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stages.fit import main
from stages.params import study_params
from stages.scaling.fit import fit_table
from stages.scaling.runs import FitError, prepare_runs
from stages.scaling.sparsity import SPARSE, SparsityLaw, fit_sparsity_table, start_grid

TRUE = SparsityLaw(1.8, 60.0, 200.0, 0.15, 30.0, 0.35, 0.40, 0.8, 0.6, 0.3)
FIT = study_params().fit.model_copy(update={"bootstrap": 30})


def study(counts=(2, 4, 8, 16), noise: float = 0.005, seed: int = 0) -> pd.DataFrame:
    """4 sizes x 4 budgets (8x each) per expert count, top-1 routing."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in counts:
        for N in (5e4, 1e5, 2e5, 4e5):
            for D in (7.5e4, 1.5e5, 3e5, 6e5):
                L = float(TRUE.loss(N, D, 1 - 1 / n)) * np.exp(rng.normal(0, noise))
                rows.append({"arch": "early-moe", "N": N, "D": D, "loss_avg": L,
                             "n_experts": n, "top_k": 1})  # fmt: skip
    rows += [{"arch": "early", "N": r["N"], "D": r["D"], "loss_avg": r["loss_avg"] * 1.05}
             for r in rows[:16]]  # fmt: skip
    return pd.DataFrame(rows)


def test_the_jacobian_matches_finite_differences():
    rng = np.random.default_rng(1)
    x, y = rng.normal(0, 1, 20), rng.normal(0, 1, 20)
    z = np.log(rng.choice([0.5, 0.25, 0.125], 20))
    theta = rng.uniform(-1, 1, (3, 10))
    lp, J = SPARSE.log_pred(theta, x, y, None, z=z)
    h = 1e-6
    for j in range(10):
        step = np.zeros(10)
        step[j] = h
        num = (SPARSE.log_pred(theta + step, x, y, None, z=z)[0]
               - SPARSE.log_pred(theta - step, x, y, None, z=z)[0]) / (2 * h)  # fmt: skip
        np.testing.assert_allclose(J[..., j], num, rtol=1e-5, atol=1e-7)
    # centring moves a, b, g by their exponents and comes back
    back = SPARSE.shift(SPARSE.shift(theta, 3.0, 4.0, -1.0), 3.0, 4.0, 1.0)
    np.testing.assert_allclose(back, theta)
    assert start_grid(theta[:, :5]).shape == (3 * 32, 10)


def test_a_swept_table_splits_by_expert_count_and_the_sparse_law_predicts_unseen_counts():
    df = prepare_runs(study())
    moe = df[df.moe_arch == "early-moe"]
    assert sorted(moe.arch.unique()) == [f"early-moe-e{n}" for n in (16, 2, 4, 8)]
    assert moe.sparsity.round(4).tolist().count(0.5) == 16
    assert df[df.arch == "early"].moe_arch.isna().all()
    fits = fit_sparsity_table(df, FIT)
    assert list(fits) == ["early-moe/avg"]
    m = fits["early-moe/avg"].metrics()
    assert m["n_experts"] == [2, 4, 8, 16] and m["n_points"] == 64
    assert m["fit_mre"] < 0.01
    assert m["heldout_mre"] < 0.015
    assert m["loso_experts_mre"] < 0.015  # an expert count the law never saw
    truth = (
        float(TRUE.loss(m["N_mid"], m["D_mid"], 15 / 16) / TRUE.loss(m["N_mid"], m["D_mid"], 0.5))
        - 1
    )
    assert m["more_experts_rel"] == pytest.approx(truth, abs=0.01)
    ci = m["bootstrap"]["more_experts_rel"]
    assert ci["low"] - 0.01 <= truth <= ci["high"] + 0.01
    assert m["bootstrap"]["resamples"] == FIT.bootstrap
    # the per-count (N, D) laws are fitted as archs of their own beside the dense one
    per_count = fit_table(df, FIT.model_copy(update={"bootstrap": 0, "families": ["paper"]}))
    assert {"early/avg", "early-moe-e2/avg", "early-moe-e16/avg"} <= set(per_count)


def test_one_expert_count_has_no_sparse_law_and_bad_sparsities_are_named():
    assert fit_sparsity_table(prepare_runs(study(counts=(8,))), FIT) == {}
    bad = study(counts=(2, 4)).assign(top_k=2)
    with pytest.raises(FitError, match="sparsity outside"):
        prepare_runs(bad.assign(n_experts=bad.n_experts.where(bad.n_experts != 2, 1)))


def test_the_fit_cli_writes_the_sparse_laws(tmp_path):
    study(counts=(2, 4, 8)).to_csv(tmp_path / "runs.csv", index=False)
    rc = main(["--runs", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "fits.json"),
               "--sparsity", str(tmp_path / "sparsity.json"), "--no-mlflow", "--law", "paper"])  # fmt: skip
    assert rc == 0
    sparse = json.loads((tmp_path / "sparsity.json").read_text())
    assert set(sparse) == {"early-moe/avg"}
    assert sparse["early-moe/avg"]["n_experts"] == [2, 4, 8]
    assert "loso_experts_mre" in sparse["early-moe/avg"]  # three counts: each one left out
    fits = json.loads((tmp_path / "fits.json").read_text())
    assert {"early/avg", "early-moe-e2/avg", "early-moe-e4/avg", "early-moe-e8/avg"} == set(fits)
