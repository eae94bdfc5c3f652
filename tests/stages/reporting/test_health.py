"""The report's transient and law checks count what they claim to."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stages.common.inputs import InputError
from stages.reporting.health import (
    bench_noise,
    law_checks,
    read_bench_noise,
    seed_noise,
    transient,
)

SIZES = {"xxs": 5e4, "xs": 1e5, "s": 2e5}
BUDGETS = [75_000, 150_000, 300_000, 600_000]


def _runs(loss) -> pd.DataFrame:
    rows = [
        {"arch": "early", "size": s, "N": n, "tokens_budget": d, "status": "ok",
         "loss_avg": loss(n, d)}
        for s, n in SIZES.items() for d in BUDGETS
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_a_power_law_grid_is_past_the_transient():
    tr = transient(_runs(lambda n, d: 0.4 + 30 / n**0.5 + 200 / d**0.5))
    t = tr["total"]
    assert (t["n_pairs"], t["d_pairs"], t["triples"]) == (2 * 4, 3 * 3, 3 * 2)
    assert tr["falling_share"] == 1 and tr["decelerating_share"] == 1
    assert tr["past_transient"] and tr["fails"] == []


def test_a_larger_model_worse_at_the_smallest_budget_and_an_accelerating_curve_are_named():
    def loss(n, d):
        base = 0.4 + 30 / n**0.5 + 200 / d**0.5
        if n == SIZES["s"] and d == 75_000:
            return base + 0.5  # s worse than xs at 75k, and its first gain too big
        if n == SIZES["xxs"] and d == 300_000:
            return base + 0.05  # xxs: small gain, then a larger one (accelerating)
        return base

    tr = transient(_runs(loss))
    t = tr["total"]
    assert t["n_falling"] == t["n_pairs"] - 1
    assert t["d_falling"] == t["d_pairs"]
    assert t["dec"] == t["triples"] - 1
    assert tr["falling_share"] == pytest.approx(16 / 17)
    assert not tr["past_transient"]
    assert any("xs→s at D 75,000" in f for f in tr["fails"])
    assert any("xxs gains" in f and "accelerating" in f for f in tr["fails"])


def test_law_checks_mark_each_target_and_skip_the_floor_law_for_E():
    fits = {
        "early/avg": {"law": "paper", "fit_r2": 0.99, "heldout_mre": 0.015, "alpha": 0.3,
                      "beta": 1.4, "E": 0.5, "bootstrap": {"E": {"low": 0.35, "high": 0.6}}},
        "late/avg": {"law": "floor", "fit_r2": 0.97, "heldout_mre": 0.03, "alpha": 0.3,
                     "beta": 0.4, "E": 0.4},
        "late/text": {"law": "paper", "fit_r2": 0.5},
    }  # fmt: skip
    early, late = law_checks(fits, {"avg": 0.4})
    assert (early["arch"], early["ok_r2"], early["ok_heldout"]) == ("early", True, True)
    assert early["ok_exponents"] is False and early["ok_E"] is False  # beta > 1; E low < floor
    assert (late["ok_r2"], late["ok_heldout"], late["ok_exponents"]) == (False, False, True)
    assert late["ok_E"] is None


def test_seed_noise_is_unmeasured_with_one_seed_and_recovered_with_several():
    assert seed_noise(_runs(lambda n, d: 0.4 + 30 / n**0.5 + 200 / d**0.5))["points"] == 0

    rng = np.random.default_rng(0)
    xs, s = SIZES["xs"], SIZES["s"]

    def law(n, d):  # one size up lowers the loss by ~2-3%, one budget up by ~10%
        big = 0.3 if (n, d) == (s, 600_000) else 0.0  # a reversal far above the noise
        return 0.4 + 30 / n**0.5 + 200 / d**0.5 + big

    def run(seed: int):
        def loss(n, d):
            if (n, d) == (s, 150_000):  # on average 0.2% above xs: a noise-sized reversal
                return law(xs, d) * (1.002 + 0.01 * (-1) ** seed)
            return law(n, d) * (1 + 0.01 * rng.standard_normal())

        return _runs(loss).assign(seed=seed)

    noise = seed_noise(pd.concat(run(seed) for seed in range(8)))
    assert (noise["points"], noise["seeds_min"], noise["seeds_max"]) == (12, 8, 8)
    assert noise["run_sd"] == pytest.approx(0.01, rel=0.25)  # planted: 1% per run
    assert noise["step_sd"] == pytest.approx(0.01 * 2**0.5, rel=0.25)  # two independent runs
    assert noise["size_step_sd"] == pytest.approx(0.01 * 2**0.5, rel=0.3)  # on either axis
    assert noise["budget_step_sd"] == pytest.approx(0.01 * 2**0.5, rel=0.3)
    drops = [(law(a, d) - law(b, d)) / law(a, d) for d in BUDGETS
             for a, b in zip(SIZES.values(), list(SIZES.values())[1:], strict=False)]  # fmt: skip
    assert noise["size_step"] == pytest.approx(np.median(drops), abs=0.01)
    assert noise["budget_step"] > noise["size_step"]
    # xs -> s at 150k (+0.2%) is within the noise; xs -> s and s 300k -> 600k (+0.3) are not
    assert (noise["not_falling"], noise["within_noise"]) == (3, 1)


def test_steps_are_taken_seed_by_seed_when_a_seed_moves_every_point_together():
    """A seed that lowers every point by 3% (a shared data order) is no noise in a step."""
    runs = pd.concat(
        _runs(lambda n, d, k=k: (0.4 + 30 / n**0.5 + 200 / d**0.5) * (1 - 0.03 * k)).assign(seed=k)
        for k in range(3)
    )
    noise = seed_noise(runs)
    assert noise["run_sd"] == pytest.approx(0.03, rel=0.05)
    assert noise["step_sd"] == pytest.approx(0.0, abs=1e-12)
    assert noise["not_falling"] == 0


def _law(n, d):
    return 0.4 + 30 / n**0.5 + 200 / d**0.5


def _grown(l0: float, l1: float, change: float) -> float:
    """The third loss of a budget triple whose gain changes by ``change`` of its middle loss:
    ((l0 - l1) - (l1 - l2)) / l1 == change (negative: the gain grows)."""
    return l1 - (l0 - l1) + change * l1


def _planted() -> dict:
    """The power law with two budget triples whose gain grows: xxs by 0.1% of its middle loss
    (noise-sized below), s by 5% (far above)."""
    loss = {(n, d): _law(n, d) for n in SIZES.values() for d in BUDGETS}
    xxs, s = SIZES["xxs"], SIZES["s"]
    loss[xxs, 300_000] = _grown(loss[xxs, 75_000], loss[xxs, 150_000], -0.001)
    loss[s, 600_000] = _grown(loss[s, 150_000], loss[s, 300_000], -0.05)
    return loss


def test_a_triple_whose_gain_grows_is_weighed_against_the_gain_change_noise():
    """Two seeds whose runs differ by +-0.1% per point (antithetic: their mean is the planted
    grid): the gain's change varies by a few tenths of a percent between seeds, the 0.1%
    growth is within two standard errors of none, the 5% one is not; a seed that moves every
    point together changes no gain."""
    loss, rng = _planted(), np.random.default_rng(0)
    eps = {k: 0.001 * rng.standard_normal() for k in loss}
    runs = pd.concat(_runs(lambda n, d, sign=sign: loss[n, d] * (1 + sign * eps[n, d]))
                     .assign(seed=i) for i, sign in enumerate((1, -1)))  # fmt: skip
    noise = seed_noise(runs)
    assert noise["accelerating"] == 2
    assert noise["accelerating_within_noise"] == 1
    assert 0.001 < noise["gain_change_sd"] < 0.01
    shifted = pd.concat(_runs(lambda n, d, k=k: loss[n, d] * (1 - 0.03 * k)).assign(seed=k)
                        for k in range(3))  # fmt: skip
    assert seed_noise(shifted)["gain_change_sd"] == pytest.approx(0.0, abs=1e-12)


def test_a_benchs_noise_weighs_a_one_seed_grid_only_when_it_ran_the_grids_points(tmp_path):
    """bench_noise: this grid's failed checks against a bench's noise when the bench's runs
    include points of this grid (the same ids); another grid's noise is named and not used."""
    loss = _planted()
    study = _runs(lambda n, d: loss[n, d]).assign(seed=0)
    study["point_id"] = [f"p{i}" for i in range(len(study))]
    tr = transient(study)
    margins = sorted(f["margin"] for f in tr["fail_margins"] if f["kind"] == "triple")
    assert margins == pytest.approx([0.001, 0.05])
    noise = {"size_step_sd": 0.004, "budget_step_sd": 0.002, "gain_change_sd": 0.003}
    bench = {"bench": "bench/isoflop.py", "arch": "early", "sizes": list(SIZES), "seeds": [0, 1],
             "noise": noise, "runs": [{"point_id": "p0"}, {"point_id": "p0-seed1"}]}  # fmt: skip
    path = tmp_path / "noise.json"
    path.write_text(json.dumps(bench))
    got = bench_noise(path, study, tr)
    assert (got["status"], got["shared"], got["runs"]) == ("current", 1, 2)
    assert (got["accelerating"], got["accelerating_within_noise"]) == (2, 1)  # 0.1% <= 2 x 0.3%
    assert got["size_step_over_noise"] == pytest.approx(got["size_step"] / 0.004)
    steps = [(_law(a, d) - _law(b, d)) / _law(a, d) for d in BUDGETS
             for a, b in zip(SIZES.values(), list(SIZES.values())[1:], strict=False)]  # fmt: skip
    assert got["size_step"] == pytest.approx(np.median(steps), abs=0.01)
    # the planted xxs row also makes xxs -> xs at 300k rise by 2.9%: far above 2 x 0.4%
    assert (got["not_falling"], got["not_falling_within_noise"]) == (1, 0)
    pair = next(f for f in tr["fail_margins"] if f["kind"] != "triple")
    assert pair["kind"] == "N" and pair["margin"] == pytest.approx(0.029, abs=0.002)
    bench["noise"] = {**noise, "size_step_sd": 0.02}  # a noisier bench: the rise is noise-sized
    path.write_text(json.dumps(bench))
    assert bench_noise(path, study, tr)["not_falling_within_noise"] == 1
    bench["noise"] = {"gain_change_sd": 0.003}  # no step noise measured: the pair is not weighed
    path.write_text(json.dumps(bench))
    got = bench_noise(path, study, tr)
    assert (got["not_falling_within_noise"], got["size_step_over_noise"]) == (None, None)
    assert got["accelerating_within_noise"] == 1

    bench["runs"] = [{"point_id": "q0"}]  # none of this grid's points: other code or data
    path.write_text(json.dumps(bench))
    got = bench_noise(path, study, tr)
    assert (got["status"], got["shared"]) == ("other", 0) and "noise" not in got
    assert bench_noise(tmp_path / "absent.json", study, tr)["status"] == "missing"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{not json", "is not JSON"),
        ('{"runs": []}', "has no 'noise' mapping"),
        (
            '{"noise": {}, "runs": [{"loss_avg": 1.0}]}',
            "'runs' must list each run with its 'point_id'",
        ),
    ],
)
def test_a_file_that_is_not_a_bench_noise_file_is_refused_naming_it_and_the_fix(
    tmp_path, text, says
):
    path = tmp_path / "noise.json"
    path.write_text(text)
    with pytest.raises(InputError, match=says) as e:
        read_bench_noise(path)
    assert str(path) in str(e.value) and "python bench/isoflop.py" in str(e.value)
    assert read_bench_noise(tmp_path / "absent.json") is None
