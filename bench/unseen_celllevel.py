"""Is ST's DE-overlap edge in the no-structure control (bench/unseen.py U1N, U1N0) a leak, or the cell-level form
of its prediction? Scores the generic response applied to real control cells (each control cell moved by the
generic shift, as ST's prior moves cells with prior_mode scale_down) beside ST and the plain generic response.

Usage (after bench/unseen.py ran U1N with --work /tmp/unseen/bA and U1N0 with --work /tmp/unseen/bE):
  python bench/unseen_celllevel.py U1N0 U1N      # -> bench/results/unseen_celllevel_check.json
"""

import json
import sys

import anndata as ad
import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from statecore.evaluation import metrics
from statecore.inference.baselines import predict_baseline
from statecore.inference.predict import predict_split
from statecore.models.transition import StateTransitionModel
from statecore.training.checkpoint import load_run

out = {}
for task in sys.argv[1:]:
    for s in range(3):
        kind = {"U1N0": "synthetic-none-noself", "U1N": "synthetic-none"}[task]
        work = {"U1N0": "bE", "U1N": "bA"}[task]
        adata = ad.read_h5ad(f"/tmp/unseen/{work}/{kind}-{s}.h5ad")
        run = load_run(f"/tmp/unseen/{work}/{task}-s{s}")
        pred, real = predict_split(run, adata, seed=s)
        gen = predict_baseline(adata, run.split, "generic_response", genes=run.genes, seed=s)
        ctrl = real.X[(real.obs["perturbation"] == "ctrl").to_numpy()]
        cm = ctrl.mean(0)
        shift = gen.X[gen.obs["predicted"].to_numpy()][0] - cm
        cells = gen.copy()
        n = int(cells.obs["predicted"].sum())
        rng = np.random.default_rng(s)
        base = ctrl[rng.integers(0, len(ctrl), n)]
        moved = StateTransitionModel.prior_cells(
            torch.from_numpy(base[None]), torch.from_numpy(shift[None, None]).float(), "scale_down"
        )[0].numpy()
        cells.X[:n] = np.clip(moved, 0, None)
        row = {}
        for name, p in (("ST", pred), ("generic_response", gen), ("generic_response_on_cells", cells)):
            res = metrics.evaluate(p, real, control="ctrl")
            agg = res.agg[res.agg["statistic"] == "mean"].mean(numeric_only=True)
            row[name] = {
                m: float(agg[m]) for m in ("pearson_delta", "overlap_at_N", "discrimination_score_l1")
            }
        out[f"{task}-s{s}"] = row
        print(task, s, {k: round(v["overlap_at_N"], 3) for k, v in row.items()}, flush=True)
json.dump(
    out,
    open(
        __import__("pathlib").Path(__file__).resolve().parent / "results" / "unseen_celllevel_check.json", "w"
    ),
    indent=1,
)
