"""The paper's bound, numerically: how the pseudo-label models' errors fall as labelled points grow, for a reward
vector inside the data's subspace and partly off it.

For each share of theta's squared norm off the subspace and each number n of labelled points, `seeds` worlds are
drawn (seed, seed + 1, ...) and the conditional model and the calibrated posterior (rcgdm/simulation/experiment.py)
are learned and sampled at one target inside the labels' range. Each is measured by its reward's shortfall to the
theory's E[r | y = a], its W2 to p(x | y = a) and its off-subspace fraction; the table holds their mean and standard
error over the worlds, and the fitted slope of log |shortfall| against log n (the paper's rate is about -1/2).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from rcgdm.simulation.experiment import Settings, draw, learn, measure

LABELLED = (50, 100, 200, 400, 800, 1600, 3200)
SHARES = (0.0, 0.1, 0.3)
SAMPLERS = ("conditional", "posterior_calibrated")
MEASURES = ("shortfall", "w2", "off_subspace")


def run_bound(settings: Settings, seeds: int, target: float) -> dict:
    """{"rows": one per world and sampler, "table": mean and standard error per (share, n, sampler), "slopes":
    the log-log slope of |shortfall| against n per (share, sampler)}."""
    rows = []
    points = [(share, n, k) for share in SHARES for n in LABELLED for k in range(seeds)]
    for share, n, k in tqdm(points, desc="bound"):
        s = replace(settings, off_subspace=share, num_labelled=n, seed=settings.seed + k)
        generator = torch.Generator().manual_seed(s.seed)
        learned = learn(s, generator, SAMPLERS)
        for name in SAMPLERS:
            measured = measure(learned.world, target, draw(learned, s, name, target, generator))
            shortfall = None if measured["diverged"] else measured["exact_reward"] - measured["reward_mean"]
            rows.append({"off_subspace_share": share, "num_labelled": n, "seed": s.seed, "sampler": name,
                         "shortfall": shortfall, "w2": measured["w2"], "off_subspace": measured["off_subspace"]})
    table = summarize(rows)
    return {"target": target, "seeds": seeds, "rows": rows, "table": table, "slopes": slopes(table)}


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and standard error over the worlds of |shortfall|, W2 and off-subspace fraction, per (share, n, sampler)."""
    out = []
    for share in SHARES:
        for n in LABELLED:
            for name in SAMPLERS:
                mine = [r for r in rows if (r["off_subspace_share"], r["num_labelled"], r["sampler"]) == (share, n, name)]
                entry = {"off_subspace_share": share, "num_labelled": n, "sampler": name}
                for key in MEASURES:
                    values = [abs(r[key]) for r in mine if r[key] is not None]
                    entry[key] = float(np.mean(values)) if values else None
                    entry[f"{key}_se"] = float(np.std(values, ddof=1) / len(values) ** 0.5) if len(values) > 1 else None
                out.append(entry)
    return out


def slopes(table: list[dict]) -> dict:
    """{"<sampler> at share <s>": the least-squares slope of log mean |shortfall| against log n}."""
    out = {}
    for share in SHARES:
        for name in SAMPLERS:
            pairs = [(r["num_labelled"], r["shortfall"]) for r in table
                     if (r["off_subspace_share"], r["sampler"]) == (share, name) and r["shortfall"]]
            fit = np.polyfit([math.log(n) for n, _ in pairs], [math.log(v) for _, v in pairs], 1) if len(pairs) > 1 else None
            out[f"{name} at share {share:g}"] = None if fit is None else float(fit[0])
    return out
