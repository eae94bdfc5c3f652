"""Measure the long-tail world's regime: does scale keep paying, and does the fit see the law?

Four measurements (each prints its numbers and writes CSV/PNG under ``--out``):

- ``oracle``: an oracle learner that knows the facts of the top-m entities (m = N / c, its
  capacity) once it has seen each at least k times (Poisson, from D) has a known loss:
  E + log(V) x the Zipf mass of what it does not know. Fitting L(N, D) = E + A/N^alpha + B/D^beta
  to it with the fit stage's code recovers the planted exponents (alpha = a - 1, beta = 1 - 1/a,
  memoriser theory) or not: a check of the fitter and the floor accounting, no network.
- ``probe``: the grid (the real pipeline: corpus, tokenizer, shards, the grid flow) at
  ``--sizes`` x ``--tokens`` on the default world with a fixed recipe; the table of losses,
  whether the smallest and largest sizes differ at the largest budget, and whether every size
  keeps falling.
- ``planted``: text-only training on worlds with two Zipf exponents; the fitted beta of each
  (the theory: beta grows with a).
- ``emergence``: from the probe's records, the loss on name and value tokens per entity-rank
  decade against tokens seen (the report draws the same from the study's own records).

    python bench/long_tail.py {oracle,probe,planted,emergence} [--out bench/out/long_tail]

The probe and planted runs take minutes (two processes; models from 57k to 817k parameters).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy.stats import poisson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.data.corpus import build_corpus  # noqa: E402
from stages.data.shards import build_shards  # noqa: E402
from stages.data.tokenizer import build as build_tokenizer  # noqa: E402
from stages.data.world import Zipf  # noqa: E402
from stages.params import REPO_PARAMS, merge, read_yaml, study_params, validate_params  # noqa: E402
from stages.reporting.figures import emergence_by_rank  # noqa: E402
from stages.scaling.fit import fit_target  # noqa: E402

OUT = ROOT / "bench" / "out" / "long_tail"
# the fixed recipe of the probes: 2 rows of 256 tokens per step (LONG-TAIL.md: small batches
# get past the step-limited transient), lr and warmup as in params.yaml
RECIPE = {"batch_rows_ref": 2, "batch_exponent": 0.0, "eval_every_tokens": 10**9}


# --------------------------------------------------------------------------- oracle


REGIMES = {"data-limited": 50.0, "balanced": 800.0, "capacity-limited": 12800.0}


def oracle_runs(a: float, c: float, K: int = 1 << 16, V: int = 64, k: int = 10, q: float = 0.05):
    """The oracle's losses on an N x D grid: it knows the facts of entity r iff r <= N / c (its
    capacity: c parameters per entity) and it saw r at least k times among D * q fact mentions
    (Poisson); an unknown value costs log V, everything else is the floor E = 1."""
    z = Zipf.of(K, a)
    p = np.exp(z.logp)
    rows = []
    for N in np.geomspace(2e4, 8e5, 8):
        capacity = np.arange(1, K + 1) <= N / c
        for D in np.geomspace(2.5e5, 1e7, 8):
            unknown = float((p * (1 - capacity * poisson.sf(k - 1, D * q * p))).sum())
            rows.append({"N": N, "D": D, "C": 6 * N * D, "loss": 1.0 + math.log(V) * unknown})
    return pd.DataFrame(rows)


def oracle(args) -> dict:
    """The fit stage on the oracle's losses, per Zipf exponent and regime (which constraint
    binds over the grid): planted alpha = a - 1, beta = 1 - 1/a (memoriser theory)."""
    fit = study_params().fit.model_copy(update={"bootstrap": 0})
    out = []
    print(f"{'a':>4} {'regime':>17} {'alpha':>14} {'beta':>14} {'E':>7} {'mean rel err':>12}")
    for a in args.planted_a + [1.5]:
        for regime, c in REGIMES.items():
            runs = oracle_runs(a, c)
            f = fit_target(runs, "oracle", "value", fit)
            m = f.metrics()
            row = {"a": a, "regime": regime, "params_per_entity": c,
                   "alpha": f.law.alpha, "alpha_planted": a - 1,
                   "beta": f.law.beta, "beta_planted": 1 - 1 / a, "E": f.law.E,
                   "fit_mean_rel_error": m["fit_mre"]}  # fmt: skip
            out.append(row)
            print(
                f"{a:>4} {regime:>17} {f.law.alpha:6.3f} ({a - 1:.3f}) {f.law.beta:6.3f} "
                f"({1 - 1 / a:.3f}) {f.law.E:7.4f} {row['fit_mean_rel_error']:12.2e}"
            )
            runs.to_csv(args.out / f"oracle_a{a}_{regime}.csv", index=False)
    return {"runs": out}


# --------------------------------------------------------------------------- pipeline runs


def prepare(root: Path, overrides: dict, mixtures: dict | None = None) -> tuple[Path, Path]:
    """Corpus, tokenizer and shards of the default params with ``overrides`` (and, replacing
    the default's, ``mixtures``) under ``root``, reused when made by the same params and code
    (stages/data/); returns
    (params.yaml, shards)."""
    root.mkdir(parents=True, exist_ok=True)
    raw = merge(read_yaml(REPO_PARAMS), overrides)
    if mixtures is not None:
        raw["grid"]["mixtures"] = mixtures
    params_path = root / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw))
    shards = root / "data" / "shards"
    # the data are reused only if the params and the code that made them are the same
    made_by = json.dumps({k: raw[k] for k in ("seed", "corpus", "tokenizer", "shards")},
                         sort_keys=True) + "".join(
        p.read_text() for p in sorted((ROOT / "stages" / "data").glob("*.py")))  # fmt: skip
    digest = hashlib.sha256(made_by.encode()).hexdigest()
    stamp = root / "data" / "made_by.sha256"
    if (shards / "info.json").exists() and stamp.exists() and stamp.read_text() == digest:
        return params_path, shards
    if (root / "data").exists():
        shutil.rmtree(root / "data")  # made by other params or code: never reused
    params = validate_params(raw)
    t0 = time.perf_counter()
    build_corpus(params, root / "data" / "corpus")
    tok = root / "data" / "tokenizer" / "tokenizer.json"
    tok.parent.mkdir(parents=True, exist_ok=True)
    build_tokenizer(params.tokenizer, root / "data" / "corpus").save(str(tok))
    build_shards(root / "data" / "corpus", tok, shards, params.shards)
    print(f"  data for {root.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    stamp.write_text(digest)
    return params_path, shards


def grid(root: Path, params_path: Path, shards: Path) -> pd.DataFrame:
    """The grid flow on these params (Prefect ephemeral, MLflow in ``root``); its runs."""
    env = dict(os.environ, PREFECT_HOME=str(root / ".prefect"))
    cmd = [sys.executable, "-m", "flows.grid", "run", "--params", str(params_path),
           "--shards", str(shards), "--codebook", str(root / "none.pt"),
           "--results", str(root / "results"),
           "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}"]  # fmt: skip
    t0 = time.perf_counter()
    with (root / "grid.log").open("w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = (root / "grid.log").read_text().splitlines()[-30:]
        raise RuntimeError(
            f"the grid failed (exit {rc}); {root / 'grid.log'} ends:\n" + "\n".join(tail)
        )
    print(f"  grid {root.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return pd.read_parquet(root / "results" / "runs.parquet")


def probe(args) -> dict:
    root = args.out / "probe"
    over = merge(
        {
            "grid": {
                "study": "probe",
                "archs": ["early"],
                "sizes": args.sizes,
                "tokens": args.tokens,
            },
            "train": RECIPE,
        },  # fmt: skip
        json.loads(args.world),
    )
    params_path, shards = prepare(root, over)
    runs = grid(root, params_path, shards)
    runs.to_csv(root / "runs.csv", index=False)
    table = runs.pivot_table(index="size", columns="tokens_budget", values="loss_avg")
    table = table.loc[sorted(table.index, key=lambda s: runs[runs["size"] == s].N.iloc[0])]
    print("probe: validation loss (avg of kinds) per size (rows) and budget (columns)")
    print(table.round(4).to_string())
    info = json.loads((shards / "info.json").read_text())["totals"]
    floors = {
        k: info[f"val/{k}"]["floor_nats_per_token"] for k in ("caption", "interleaved", "text")
    }
    floor = sum(floors.values()) / 3
    top = table.columns.max()
    gap = table[top].iloc[0] - table[top].iloc[-1]
    falling = {s: bool((np.diff(table.loc[s].to_numpy()) < 0).all()) for s in table.index}
    print(
        f"floor (avg) {floor:.4f}; at D={top}: smallest - largest = {gap:.4f} nats; "
        f"falling at every budget: {falling}"
    )
    return {"table": table.round(5).to_dict(), "floor": floor, "gap_at_max": gap,
            "falling": falling}  # fmt: skip


def planted(args) -> dict:
    """Text-only training on worlds with two Zipf exponents: the fitted beta of each."""
    out = {}
    fit = study_params().fit.model_copy(update={"bootstrap": 20})
    for a in args.planted_a:
        root = args.out / f"planted-a{a}"
        over = {
            "corpus": {"synthetic": {"zipf_a": a}},
            "grid": {"study": f"planted-{a}", "archs": ["early"], "sizes": args.sizes,
                     "tokens": args.tokens},
            "train": RECIPE,
        }  # fmt: skip
        params_path, shards = prepare(root, over, mixtures={"text": {"text": 1.0}})
        runs = grid(root, params_path, shards)
        runs = runs[runs.mixture == "text"].assign(loss=lambda r: r.loss_text)
        runs.to_csv(root / "runs.csv", index=False)
        f = fit_target(runs[["N", "D", "C", "loss"]], "early", "text", fit)
        lo, hi = np.percentile(f.boot["beta"], [2.5, 97.5]) if f.boot else (math.nan,) * 2
        # with E at the world's exact floor: the data exponent of each size, from the slope of
        # log(L - floor) on log D (all budgets, and without the smallest: the transient)
        info = json.loads((shards / "info.json").read_text())["totals"]["val/text"]
        floor = info["floor_nats_per_token"]
        slopes = {}
        for size, g in runs.sort_values("D").groupby("size"):
            x, y = np.log(g.D.to_numpy()), np.log(g.loss.to_numpy() - floor)
            slopes[size] = (-np.polyfit(x, y, 1)[0], -np.polyfit(x[1:], y[1:], 1)[0])
        out[a] = {"beta": f.law.beta, "beta_ci": [lo, hi], "alpha": f.law.alpha,
                  "theory_beta": 1 - 1 / a, "E": f.law.E, "floor": floor,
                  "beta_per_size_floor_anchored": slopes}  # fmt: skip
        print(
            f"a={a}: fitted beta {f.law.beta:.3f} [{lo:.3f}, {hi:.3f}] (memoriser theory "
            f"{1 - 1 / a:.3f}), alpha {f.law.alpha:.3f}, E {f.law.E:.3f} (floor {floor:.3f}); "
            "beta per size with E at the floor (all budgets / without the smallest): "
            + ", ".join(f"{s} {b:.3f}/{b2:.3f}" for s, (b, b2) in slopes.items())
        )
    return out


def emergence(args) -> dict:
    """The report's figure of loss by entity-rank decade, from the probe's records."""
    runs = pd.read_parquet(args.out / "probe" / "results" / "runs.parquet")
    path = emergence_by_rank(runs, args.out)
    print(f"emergence: {path}")
    cols = sorted(c for c in runs.columns if c.startswith("eval_value_rank1e"))
    table = runs.sort_values(["N", "D"]).set_index(["size", "tokens_budget"])[cols]
    print(table.round(3).to_string())
    return {"figure": str(path), "value_loss_by_rank": table.round(4).to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["oracle", "probe", "planted", "emergence"])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--a", type=float, default=1.5, help="oracle: the Zipf exponent")
    ap.add_argument("--params-per-entity", type=float, default=800.0, help="oracle: capacity")
    ap.add_argument("--sizes", nargs="+", default=["xxs", "xs", "s", "m", "l"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[125_000, 250_000, 500_000, 1_000_000])
    ap.add_argument("--planted-a", nargs="+", type=float, default=[1.3, 1.7])
    ap.add_argument("--world", default="{}", help="JSON overrides of the params (the world)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"oracle": oracle, "probe": probe, "planted": planted, "emergence": emergence}[
        args.what
    ](args)
    (args.out / f"{args.what}.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
