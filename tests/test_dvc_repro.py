"""End to end: a fresh git + DVC checkout of this repo runs `dvc repro` through the grid, then nothing.

The params are the committed params.yaml with the tiny data of tests/conftest.py and the tiny
grid of tests/flows/tiny_params.yaml, grown to 2 sizes x 3 budgets (12 points of a few seconds
each) so that the fit stage has a law to fit and the report something to compare.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pyarrow.parquet as pq
import pytest
import yaml

from stages.params import merge, read_yaml
from tests.conftest import TINY_PARAMS

ROOT = Path(__file__).resolve().parents[1]
TINY_GRID = yaml.safe_load((ROOT / "tests/flows/tiny_params.yaml").read_text())
E2E = {
    "grid": {"sizes": ["xxs", "xs"], "tokens": [2048, 4096, 6144]},
    "fit": {
        "bootstrap": 5,
        "init": {"alpha": [0, 0.5, 2.5], "beta": [0, 0.5, 2.5], "a": [0, 5, 10], "b": [0, 5, 10]},
    },
}
STAGES = ("corpus", "tokenizer", "shards", "codebook", "grid", "fit", "report")


def downstream(dot: str, stage: str) -> set[str]:
    """The stages ``dvc dag --dot`` puts downstream of ``stage``."""
    edges = [
        [n.strip(' ";') for n in line.split("->")] for line in dot.splitlines() if "->" in line
    ]
    return nx.descendants(nx.DiGraph(edges), stage)


def dvc_status(dvc: list[str], repo: Path, env: dict[str, str]) -> dict:
    """``dvc status --json``: the stages out of date and why."""
    return json.loads(run([*dvc, "status", "--json"], repo, env).strip().splitlines()[-1])


def plan(repo: Path, env: dict[str, str]) -> list[dict]:
    """The grid's dry run: one row per point (its ids, and done | train)."""
    out = run([sys.executable, "-m", "flows.grid", "plan", "--json"], repo, env).splitlines()
    return [json.loads(line) for line in out if line.startswith("{")]


def run(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def fresh_checkout(root: Path, params: dict) -> tuple[Path, dict[str, str], list[str]]:
    """A git repository at ``root/repo`` holding this working tree as a commit would (no
    dvc.lock) with ``params`` as its params.yaml, committed; its environment and dvc command."""
    repo = root / "repo"
    tracked = subprocess.run(  # the working tree as a commit would have it
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in tracked:
        if (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    (repo / "dvc.lock").unlink(missing_ok=True)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(
        os.environ,
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    # mlflow.set_tracking_uri() in earlier tests exports MLFLOW_TRACKING_URI: a fresh checkout
    # must use its own default store
    env.pop("MLFLOW_TRACKING_URI", None)
    dvc = [str(Path(sys.executable).parent / "dvc")]
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "fresh"], repo, env)
    return repo, env, dvc


@pytest.mark.slow
def test_dvc_repro_in_a_fresh_checkout_runs_every_stage_then_nothing(tmp_path):
    params = merge(merge(merge(read_yaml(ROOT / "params.yaml"), TINY_PARAMS), TINY_GRID), E2E)
    repo, env, dvc = fresh_checkout(tmp_path, params)
    out = run([*dvc, "repro"], repo, env)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
    manifest = pq.read_table(repo / "data/shards/manifest.parquet").to_pylist()
    assert {r["kind"] for r in manifest} == {"caption", "interleaved", "text"}
    assert (repo / "data/corpus/report.json").exists()
    ignored = (repo / "data/.gitignore").read_text().split()
    assert {"/corpus", "/tokenizer", "/shards", "/codebook"} <= set(ignored)  # kept out of git
    runs = pq.read_table(repo / "results/runs.parquet").to_pylist()
    assert len(runs) == 12 and {r["status"] for r in runs} == {"ok"}
    assert "/points" in (repo / "results/.gitignore").read_text().split()  # runs.parquet: git
    assert (repo / "results/groups/.gitignore").read_text().split()[-1] == "*"  # checkpoints
    assert (repo / "mlflow.db").exists()  # the default MLflow store, beside the repo's code
    # fit: DVC metrics; report: markdown + html from this run's fits; plots render
    fits = json.loads((repo / "results/fits.json").read_text())
    assert {"early/avg", "late/avg", "early/caption", "late/text"} <= set(fits)
    metrics = run([*dvc, "metrics", "show"], repo, env)
    assert "early/avg.alpha" in metrics or "early/avg" in metrics
    report = (repo / "results/report.md").read_text()
    paper = fits["early/avg"]["families"]["paper"]  # Table 2 compares the paper's form
    assert f"| early/avg | this study | {paper['E']:.4g}" in report
    assert "report/figures/loss_vs_compute.png" in report
    # the committed bench noise is the default study's (its point ids), not this tiny grid's
    assert "`bench/isoflop_noise.json` holds a bench's" in report and "measured it" not in report
    assert (repo / "results/report.html").stat().st_size > 50_000  # figures inline
    run([*dvc, "plots", "show", "-o", "dvc_plots"], repo, env)
    html = (repo / "dvc_plots/index.html").read_text()
    assert "loss_vs_compute.png" in html and "early_xxs.csv" in html

    again = run([*dvc, "repro"], repo, env)
    assert "Running stage" not in again and "up to date" in again

    # a params change is a changed dependency of the stage that reads it, and of no other; the
    # stages downstream of it in the DAG rerun. (No rerun here: new data retrains every point,
    # which tests/flows/test_plan.py shows on the ids without training.)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    before = params["shards"]["val_fraction"]
    params["shards"]["val_fraction"] = 0.3
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    status = dvc_status(dvc, repo, env)
    assert status == {"shards": [{"changed deps": {"params.yaml": {"shards": "modified"}}}]}
    dag = run([*dvc, "dag", "--dot"], repo, env)
    assert {"codebook", "grid", "fit", "report"} <= downstream(dag, "shards"), dag
    params["shards"]["val_fraction"] = before
    trained = {r["point_id"]: r for r in runs}

    # a new token budget changes the grid stage only; its plan trains the 4 new points and keeps
    # the 12 (a grid that trains only its new points: tests/flows/test_grid.py)
    params["grid"]["tokens"].append(8192)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert set(dvc_status(dvc, repo, env)) == {"grid"}
    rows = plan(repo, env)
    assert {r["point_id"] for r in rows if r["status"] == "done"} == set(trained)
    assert len(rows) == 16 and sum(r["status"] == "train" for r in rows) == 4

    # code: a comment edit, and a change to code that early and late do not run, change no id
    # (the stages that depend on the files are out of date: the codebook encodes with
    # model/discrete.py); a changed constant they run changes every id
    layers, discrete = repo / "model/layers.py", repo / "model/discrete.py"
    layers.write_text(layers.read_text().replace("class RMSNorm", "# normalisation\nclass RMSNorm"))
    discrete.write_text(discrete.read_text().replace("= 1 << 20", "= 1 << 21"))
    assert set(dvc_status(dvc, repo, env)) == {"codebook", "grid"}
    assert plan(repo, env) == rows
    layers.write_text(layers.read_text().replace("eps: float = 1e-5", "eps: float = 1e-6"))
    changed = plan(repo, env)
    assert len(changed) == 16 and {r["status"] for r in changed} == {"train"}
    assert not {r["point_id"] for r in changed} & {r["point_id"] for r in rows}
