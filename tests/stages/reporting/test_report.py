"""stages/report.py: the report is built from this run's runs and fits, and its verdicts follow
the data and the rules of stages/reporting/findings.py (a study built to reproduce each finding,
one built to contradict them at two seeds, the same at one seed, and judge()'s rules one by one)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from stages.fit import run_fit
from stages.params import study_params
from stages.report import main, run_report

SIZES = {"xxs": 5e4, "xs": 1.2e5, "s": 2e5, "m": 4.6e5}
TOKENS = [25_000, 50_000, 100_000]
FIT = {
    "bootstrap": 4,
    "starts_per_exponent_pair": 1,
    "init": {
        "alpha": [0, 0.5, 2.5],
        "beta": [0, 0.5, 2.5],
        "a": [0, 5, 10],
        "b": [0, 5, 10],
        "e": [-1, 0.5],
    },
}


def study(
    tmp_path, offsets: dict[str, float], late_A: float, seeds=(0,), sizes=None
) -> pd.DataFrame:
    """A grid table from a known law per arch: loss = law(N, D) * (1 + offset), where late
    fusion's law has A = ``late_A`` (the others 300), at each of ``seeds`` (0.2% noise). Writes
    points/<id>/metrics.jsonl and, for MoE archs, routing.json."""
    rng = np.random.default_rng(0)
    rows = []
    for arch, off, (size, N), tokens, seed in (
        (a, o, sz, t, sd) for a, o in offsets.items() for sz in (sizes or SIZES).items()
        for t in TOKENS for sd in seeds
    ):  # fmt: skip
        law = 0.5 + (late_A if arch == "late" else 300) / N**0.5 + 400 / tokens**0.5
        law *= 1 + off
        pid = f"{arch}-{size}-{tokens}-s{seed}"
        kinds = {k: law * f * (1 + rng.normal(0, 0.002))
                 for k, f in (("caption", 0.9), ("interleaved", 1.0), ("text", 1.1))}  # fmt: skip
        rows.append({
            "point_id": pid, "status": "ok", "arch": arch, "moe": "moe" in arch,
            "size": size, "tokens_budget": tokens, "mixture": "45-45-10", "seed": seed,
            "N": int(N), "D": tokens, "C": 6 * N * tokens * (1.2 if arch == "late" else 1),
            **{f"loss_{k}": v for k, v in kinds.items()},
            "loss_avg": float(np.mean(list(kinds.values()))),
        })  # fmt: skip
        pdir = tmp_path / "results" / "points" / pid
        pdir.mkdir(parents=True)
        curve = [{"step": s, "tokens": 1024 * s, "train_loss": 6 / s**0.3} for s in range(1, 30)]
        (pdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
        if "moe" in arch:
            layers = [{"image": list(rng.dirichlet(np.ones(8))), "text": list(rng.dirichlet(np.ones(8))),
                       "image_tokens": 100.0, "text_tokens": 300.0} for _ in range(4)]  # fmt: skip
            (pdir / "routing.json").write_text(
                json.dumps({"arch": arch, "size": size, "layers": layers})
            )
    runs = pd.DataFrame(rows)
    runs.to_parquet(tmp_path / "results" / "runs.parquet")
    return runs


def build(tmp_path, offsets, late_A, seeds=(0,), sizes=None, plots=False):
    """The study's fits and report. ``plots``: the fit stage's figures too (about a third of
    the time; only the test that looks at figures asks for them)."""
    study(tmp_path, offsets, late_A, seeds, sizes)
    res = tmp_path / "results"
    fit = study_params({"fit": FIT}).fit
    run_fit(res / "runs.parquet", res / "fits.json", fit, plots=res / "plots" if plots else None,
            use_mlflow=False, plot_data=res / "plot_data" if plots else None)  # fmt: skip
    shards = tmp_path / "shards"
    shards.mkdir()
    floors = {"caption": 0.16, "interleaved": 0.18, "text": 0.43}
    info = {"totals": {f"val/{k}": {"floor_nats_per_token": v} for k, v in floors.items()}}
    (shards / "info.json").write_text(json.dumps(info))
    cb = tmp_path / "codebook.json"  # the codebook stage's report: none unless a test writes it
    noise = tmp_path / "noise.json"  # a bench's two-seed noise: none unless a test writes it
    assert main(["--results", str(res), "--shards", str(shards), "--codebook", str(cb),
                 "--noise", str(noise)]) == 0  # fmt: skip
    return res


def verdicts(res):
    return {f["claim"].split()[0] + " " + f["claim"].split()[1]: f["verdict"]
            for f in json.loads((res / "report" / "findings.json").read_text())}  # fmt: skip


REPRODUCE = {"early": 0.0, "late": 0.01, "discrete": 0.3, "early-moe": -0.05,
             "early-moe-aware": -0.02}  # fmt: skip


@pytest.fixture(scope="module")
def reproducing(tmp_path_factory):
    """The study built to reproduce every finding (its folder, built once for the file)."""
    root = tmp_path_factory.mktemp("reproduce")
    build(root, REPRODUCE, late_A=450, plots=True)
    return root


def test_a_study_that_reproduces_the_findings_is_reported_as_such(reproducing, tmp_path):
    shutil.copytree(reproducing, tmp_path, dirs_exist_ok=True)
    res = tmp_path / "results"
    offsets = REPRODUCE
    md = (res / "report.md").read_text()
    assert set(verdicts(res).values()) == {"reproduced"}, verdicts(res)
    for fig in ("loss_vs_compute", "equal_compute", "optimal_allocation",
                "predicted_vs_observed", "moe_routing", "loss_curves"):  # fmt: skip
        assert f"report/figures/{fig}.png" in md
        assert (res / "report" / "figures" / f"{fig}.png").stat().st_size > 5000
    assert "plots/isoflop_early_avg.png" in md
    fits = json.loads((res / "fits.json").read_text())
    # the comparison table holds this run's fitted numbers beside the paper's constants
    paper = fits["early/avg"]["families"]["paper"]  # Table 2 compares the paper's form
    assert f"| early/avg | this study | {paper['E']:.4g}" in md
    assert "| | paper | 1.904 |" in md
    assert "| 0.257 |" in md  # the avg entropy floor beside E: (0.16 + 0.18 + 0.43) / 3
    # the prediction intervals checked on held-out runs, per arch and pooled
    assert "### How sure a prediction is" in md
    k, n = map(int, md.split("| **all** | | ")[1].split(" ")[0].split("/"))
    held = sum(f["coverage"]["heldout_n"] for f in fits.values())
    assert n == held and 0 <= k <= n
    html = (res / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') >= 6 and "report/figures" not in html
    assert len(list((res / "report" / "curves").glob("*.csv"))) == len(offsets) * len(SIZES)


# smaller sizes than SIZES: both archs' compute-optimal N lie among them when late's A is 200
SMALL = {"xxs": 2.5e4, "xs": 6e4, "s": 1.5e5, "m": 4e5}
AGAINST = {"early": 0.0, "late": -0.02, "discrete": -0.05, "early-moe": 0.05,
           "early-moe-aware": 0.0}  # fmt: skip


def test_a_study_that_contradicts_them_at_two_seeds_is_reported_as_contradicted(tmp_path):
    res = build(tmp_path, AGAINST, late_A=200, seeds=(0, 1), sizes=SMALL)
    v = verdicts(res)
    # the N_opt claim is judged on fits that pool the seeds: no effect per seed, never contradicted
    assert v.pop("Late fusion") == "not reproduced at this scale"
    assert set(v.values()) == {"contradicted"}, v
    found = json.loads((res / "report" / "findings.json").read_text())
    assert all(set(f["seeds"]) == {"0", "1"} for f in found if f["seeds"]), found
    assert all(len(f["frontier"]) >= 2 for f in found), [f["frontier"] for f in found]
    md = (res / "report.md").read_text()
    assert md.index("**Scope.**") < md.index("## Findings") and "2 seeds" in md


def test_one_seed_never_contradicts_and_an_extrapolated_optimum_is_not_testable(tmp_path):
    v = verdicts(build(tmp_path, AGAINST, late_A=200))
    assert v.pop("Late fusion") == "not testable here"  # late's N_opt below its smallest size
    assert set(v.values()) == {"not reproduced at this scale"}, v
    found = json.loads((tmp_path / "results" / "report" / "findings.json").read_text())
    late = next(f for f in found if f["claim"].startswith("Late fusion"))
    assert "outside the sizes trained" in late["reason"] and late["effect"] < 0
    assert all("one seed" in f["reason"] for f in found if f["verdict"].startswith("not repro"))


def test_discrete_is_not_testable_when_the_codebook_keeps_what_the_images_show(
    reproducing, tmp_path
):
    shutil.copytree(reproducing, tmp_path, dirs_exist_ok=True)
    res = tmp_path / "results"
    assert verdicts(res)["Discrete visual"] == "reproduced"
    for share, want in ((0.004, "not testable here"), (0.2, "reproduced")):
        info = {"bits_per_look": 4.5, "bits_lost": 4.5 * share, "share_lost": share,
                "looks": 1024, "code_tuples": 900, "mass_shared": 0.1}  # fmt: skip
        (tmp_path / "codebook.json").write_text(json.dumps({"information": info}))
        args = ["--shards", str(tmp_path / "shards"), "--codebook", str(tmp_path / "codebook.json"),
                "--noise", str(tmp_path / "noise.json")]  # fmt: skip
        assert main(["--results", str(res), *args]) == 0
        assert verdicts(res)["Discrete visual"] == want, share
        found = json.loads((res / "report" / "findings.json").read_text())
        assert f"loses {share:.2%}" in found[-1]["evidence"]
        assert f"**{100 * share:.2f}%** lost" in (res / "report.md").read_text()


def test_judge_follows_its_rules():
    from stages.reporting.findings import VERDICTS, judge

    both = {"0": -0.02, "1": -0.01}
    # the interval on the claimed side (claimed -1: a lower loss)
    assert (
        judge(-0.02, -0.03, -0.01, -1, {"paper": -0.02, "shared": -0.01}, both)[0] == "reproduced"
    )
    assert judge(-0.02, -0.03, -0.01, -1, {}, 1)[0] == "reproduced"
    verdict, reason, _ = judge(-0.02, -0.03, -0.01, -1, {"paper": 0.01, "shared": -0.01}, both)
    assert verdict == "inconclusive" and "paper shows the opposite" in reason
    # the interval on the opposite side: contradicted only across families and seeds
    against = {"0": 0.02, "1": 0.01}
    assert judge(0.02, 0.01, 0.03, -1, {"paper": 0.02, "floor": 0.01}, against)[0] == "contradicted"
    v, why, _ = judge(0.02, 0.01, 0.03, -1, {"paper": 0.02, "floor": -0.001}, against)
    assert v == "not reproduced at this scale" and "floor does not show it" in why
    v, why, _ = judge(0.02, 0.01, 0.03, -1, {"paper": 0.02}, {"0": 0.03, "1": -0.01})
    assert v == "not reproduced at this scale" and "seed 1 does not show it" in why
    v, why, _ = judge(0.02, 0.01, 0.03, -1, {"paper": 0.02}, {"0": 0.02})
    assert v == "not reproduced at this scale" and "one seed" in why
    assert judge(0.02, 0.01, 0.03, +1, {"paper": 0.02}, 2)[0] == "reproduced"
    v, why, _ = judge(-0.02, -0.03, -0.01, +1, {"paper": -0.02}, 2)  # pooled over 2 seeds
    assert v == "not reproduced at this scale" and "pool the seeds" in why
    # the interval contains zero
    v, why, decide = judge(0.005, -0.005, 0.015, -1, {"paper": 0.02}, against)
    assert v == "inconclusive" and "contains zero" in why and "against the claim" in decide
    assert judge(0.01, None, None, -1)[0] == "inconclusive"
    assert {judge(*a)[0] for a in [(-0.02, -0.03, -0.01, -1), (0.01, -0.01, 0.03, -1)]} <= set(
        VERDICTS
    )


def test_missing_archs_are_not_testable_and_missing_inputs_are_named(tmp_path, caplog):
    res = build(tmp_path, {"early": 0.0, "early-moe": -0.05}, 300)
    v = verdicts(res)
    assert v["Early fusion"] == v["Late fusion"] == v["Discrete visual"] == "not testable here"
    assert v["MoE beats"] == "reproduced"
    found = json.loads((res / "report" / "findings.json").read_text())
    assert "no late runs" in found[0]["reason"]
    # a study file of the repository that trains the missing archs is named
    assert "studies/" in found[0]["reason"] and "docs/study.md" in found[0]["reason"]
    (res / "fits.json").unlink()
    assert main(["--results", str(res)]) == 2
    assert "fits.json not found" in caplog.text


def test_degenerate_fits_still_give_a_report(tmp_path):
    res = build(tmp_path, {"early": 0.0, "late": 0.01}, 300)
    fits = json.loads((res / "fits.json").read_text())
    fits["early/avg"]["alpha"] = -3.0  # as a degenerate fit reports it
    (res / "fits.json").write_text(json.dumps(fits))
    assert run_report(res, tmp_path / "shards", codebook=None).exists()
    assert "early/avg (degenerate)" in (res / "report.md").read_text()
    assert verdicts(res)["Late fusion"] == "inconclusive"


def test_several_mixtures_give_the_table_3_comparison(tmp_path):
    """Two mixtures of one arch: each fitted as its own arch, and the report's table and figure
    of E, a, b against the caption share (paper Table 3)."""
    from stages.scaling.fit import fit_table
    from stages.scaling.runs import prepare_runs

    rows = []
    for mix, share, b_scale in (("45-45-10", 0.45, 1.0), ("20-40-40", 0.20, 1.5)):
        for size, N in SIZES.items():
            for D in TOKENS:
                L = 1.0 + 40 / N**0.3 + b_scale * 300 / D**0.4
                rows.append({"arch": "early", "mixture": mix, "size": size, "N": N, "D": D,
                             "loss_avg": L, "share": share})  # fmt: skip
    df = prepare_runs(pd.DataFrame(rows).drop(columns=["share", "size"]))
    fit = study_params({"fit": FIT}).fit
    mixtures = {"45-45-10": {"caption": 0.45, "interleaved": 0.45, "text": 0.1},
                "20-40-40": {"caption": 0.2, "interleaved": 0.4, "text": 0.4}}  # fmt: skip
    fits = fit_table(df, fit, mixtures=mixtures)
    assert set(fits) == {"early-45-45-10/avg", "early-20-40-40/avg"}
    m = fits["early-20-40-40/avg"].metrics()["mixture"]
    assert m == {"base_arch": "early", "name": "20-40-40", "shares": mixtures["20-40-40"]}
    from stages.reporting.document import mixtures_table
    from stages.reporting.figures import mixture_exponents

    entries = {k: f.metrics() for k, f in fits.items()}
    table = mixtures_table(entries)
    assert [r[1] for r in table["rows"]] == ["20-40-40", "45-45-10"]  # by caption share
    assert table["rows"][0][-1] == "1.836 / 0.582 / 0.423"  # the paper's row beside ours
    assert mixture_exponents(entries, tmp_path).stat().st_size > 5000


def test_a_one_seed_grid_shows_the_benchs_noise_only_when_the_bench_ran_its_points(
    reproducing, tmp_path
):
    """bench/isoflop.py's noise file (its writer, ``noise_record``): shown with this grid's size
    step against it when some of its runs are this study's points (the same ids), refused as
    another study's when none is, and the plain sentence without the file."""
    from bench.isoflop import noise_record
    from stages.reporting.health import median_steps

    shutil.copytree(reproducing, tmp_path, dirs_exist_ok=True)
    res = tmp_path / "results"
    runs = pd.read_parquet(res / "runs.parquet")
    early = runs[runs.arch == "early"].assign(git_revision="abc")
    rng = np.random.default_rng(1)
    again = early.assign(seed=1, point_id=early.point_id.str.replace("-s0", "-s1"),
                         loss_avg=early.loss_avg * (1 + rng.normal(0, 0.01, len(early))))  # fmt: skip
    bench = pd.concat([early, again], ignore_index=True)
    rec = noise_record(bench, {"machine": "here", "measured": "2026-01-01", "scale": 1.0})
    assert len(rec["runs"]) == 2 * len(early) and rec["git_revision"] == "abc"
    noise = rec["noise"]
    assert noise["points"] == len(early) and 0 < noise["size_step_sd"] < 0.05
    assert rec["sizes"] == list(SIZES) and rec["seeds"] == [0, 1] and rec["machine"] == "here"
    path = tmp_path / "noise.json"
    base = ["--results", str(res), "--shards", str(tmp_path / "shards"), "--noise", str(path)]

    # one pair whose loss does not fall (m above s at the smallest budget, by a noise-sized
    # 0.1%): the report weighs it against the bench's size-step noise
    i = runs.index[(runs.arch == "late") & (runs["size"] == "m") & (runs.tokens_budget == 25_000)]
    j = runs.index[(runs.arch == "late") & (runs["size"] == "s") & (runs.tokens_budget == 25_000)]
    runs.loc[i, "loss_avg"] = float(runs.loc[j, "loss_avg"].iloc[0]) * 1.001
    runs.to_parquet(res / "runs.parquet")
    path.write_text(json.dumps(rec))
    assert main(base) == 0
    md = (res / "report.md").read_text()
    health = json.loads((res / "report" / "health.json").read_text())["bench_noise"]
    assert (health["status"], health["shared"], health["runs"]) == ("current", len(early), 24)
    ratio = median_steps(runs)["size_step"] / noise["size_step_sd"]
    assert health["size_step_over_noise"] == pytest.approx(ratio)
    assert "`bench/isoflop.py` measured it" in md and f"**{ratio:.1f}×** the noise of a size" in md
    assert f"by {100 * noise['size_step_sd']:.2f}% one size up" in md
    assert "not measured by this grid" in md and ", on here, 2026-01-01)" in md
    assert (health["not_falling"], health["not_falling_within_noise"]) == (1, 1)
    assert "The one pair whose loss does not fall is within 2 step noises" in md

    other = {**rec, "runs": [{**r, "point_id": r["point_id"] + "-other"} for r in rec["runs"]]}
    path.write_text(json.dumps(other))  # measured by other code or data: other point ids
    assert main(base) == 0
    md = (res / "report.md").read_text()
    assert "not shown as this study's" in md and "measured it" not in md

    path.write_text("{not json")  # a broken file: refused before the report is rewritten
    before = (res / "report.md").read_text()
    assert main(base) != 0 and (res / "report.md").read_text() == before

    path.unlink()
    assert main(base) == 0
    md = (res / "report.md").read_text()
    assert "every point has one seed (`grid.seeds: [0, 1]` measures it" in md


def test_a_reanalysis_never_stamps_old_runs_with_this_machine_or_date(tmp_path):
    """bench/isoflop.py ``trained_where``: a call that trains records this machine and today;
    ``--analyse`` of those runs reads that record back, or a noise file of exactly these runs,
    and otherwise says it does not know."""
    from bench.isoflop import machine, trained_where

    runs = pd.DataFrame({"point_id": ["a", "b"]})
    noise = tmp_path / "noise.json"
    fresh = trained_where(tmp_path, runs, noise, analyse=False, scale=1.0)
    assert fresh["machine"] == machine() and fresh["scale"] == 1.0 and fresh["measured"]
    assert trained_where(tmp_path, runs, noise, analyse=True, scale=4.0) == fresh
    (tmp_path / "trained.json").unlink()
    old = {"machine": "elsewhere", "measured": "2026-01-01", "scale": 4.0}
    noise.write_text(json.dumps({**old, "runs": [{"point_id": "a"}, {"point_id": "b"}]}))
    assert trained_where(tmp_path, runs, noise, analyse=True, scale=1.0) == old
    other = pd.DataFrame({"point_id": ["a", "c"]})  # not the runs the noise file holds
    assert trained_where(tmp_path, other, noise, analyse=True, scale=1.0) == dict.fromkeys(old)
