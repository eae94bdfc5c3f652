"""The fit on a published ladder: Epoch AI's reconstruction of the Chinchilla runs.

Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt") extracted 245 runs (model
size, training FLOP, loss) from Hoffmann et al. 2022's Figure 4. Their file is not shipped here
(no downloads at run time): get ``data/svg_extracted_data.csv`` from
github.com/epoch-research/analyzing-chinchilla and pass its path. As Epoch did, D = FLOP / 6N and
the 5 runs of highest loss are dropped (240 left).

Prints the paper-form fit (App. C: Huber on log L, multi-start; Epoch report E 1.82, α 0.348,
β 0.366), the law chosen by extrapolation, the prediction with its interval at Chinchilla itself
(N 7e10, D 1.4e12) and the interval's coverage of held-out runs, and the fit's time.

    python bench/epoch_chinchilla.py --csv svg_extracted_data.csv [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd

from stages.fit import describe, predict, run_fit
from stages.params import study_params


def runs_table(csv: str | Path) -> pd.DataFrame:
    """Epoch's columns as a runs table (N, D, loss, C), the 5 highest losses dropped."""
    df = pd.read_csv(csv)
    need = {"Model Size", "Training FLOP", "loss"}
    if not need <= set(df.columns):
        raise SystemExit(f"{csv}: expected columns {sorted(need)}, found {list(df.columns)}")
    df = df.dropna(subset=sorted(need))
    cut = sorted(df["loss"])[-5]
    df = df[df["loss"] < cut]
    N, C = df["Model Size"].astype(float), df["Training FLOP"].astype(float)
    return pd.DataFrame({"N": N, "D": C / (6 * N), "loss": df["loss"].astype(float), "C": C})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csv", required=True, help="Epoch's data/svg_extracted_data.csv")
    ap.add_argument("--out", default=None, help="where to keep runs.csv and fits.json")
    ap.add_argument("--N", type=float, default=7e10, help="predict here (default: Chinchilla)")
    ap.add_argument("--D", type=float, default=1.4e12)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out or tempfile.mkdtemp(prefix="epoch-chinchilla-"))
    out.mkdir(parents=True, exist_ok=True)
    runs = runs_table(args.csv)
    runs.to_csv(out / "runs.csv", index=False)
    print(f"{len(runs)} runs: N {runs.N.min():.3g}-{runs.N.max():.3g}, "
          f"D {runs.D.min():.3g}-{runs.D.max():.3g}")  # fmt: skip
    params = study_params().fit
    for law in ("paper", "auto"):
        fit = params.model_copy(update={"law": law})
        t0 = time.perf_counter()
        run_fit(out / "runs.csv", out / f"fits_{law}.json", fit, use_mlflow=False)
        seconds = time.perf_counter() - t0
        e = json.loads((out / f"fits_{law}.json").read_text())["all/all"]
        print(f"\nfit.law: {law} ({seconds:.1f} s): {e['law']} law, E {e['E']:.4f}, "
              f"alpha {e['alpha']:.4f}, beta {e['beta']:.4f}; {e['law_why']}")  # fmt: skip
        print(describe(predict(out / f"fits_{law}.json", args.N, args.D, None, None)))
    print(f"\nfiles in {out}")


if __name__ == "__main__":
    main()
