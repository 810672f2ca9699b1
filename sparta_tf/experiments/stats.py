"""The statistics of a grid: means and spreads over seeds, and paired differences.

`summarize(cells)` gives, per objective and arm, the mean, sample std and n of each
metric over the seeds (`mean_std`). `paired(cells, objective, arm, other, metric)` takes
the difference of two arms image by image and seed by seed, with a 95% interval from a
two-level bootstrap over seeds and test images.
"""

import numpy as np

from sparta_tf.experiments.cells import unpack

METRICS = ("clean", "pgd", "autoattack")


def mean_std(values):
    """Mean, sample std (None for one value) and n; all None for no values."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "std": std, "n": len(values)}


def summarize(cells):
    """Per objective and activation (in grid order): the stats of each metric over seeds.

    The eps curve is averaged over seeds, eps by eps.
    """
    groups = {}
    for cell in cells:
        groups.setdefault((cell["objective"], cell["activation"]), []).append(cell)
    rows = []
    for (objective, activation), group in groups.items():
        row = {"objective": objective, "activation": activation,
               "seeds": [c["seed"] for c in group]}
        for metric in METRICS:
            row[metric] = mean_std([c[metric] for c in group if c[metric] is not None])
        curves = np.array([c["eps_curve"] for c in group], np.float64)  # [seed, eps, 2]
        row["eps_curve"] = curves.mean(axis=0).tolist() if curves.size else []
        rows.append(row)
    return rows


def paired(cells, objective, arm, other, metric, reps=2000, seed=0):
    """`arm` minus `other` in accuracy under `metric`, paired by test image and seed.

    Both arms saw the same test images at the same seeds, so the difference is
    taken image by image. The 95% interval is a two-level bootstrap: each of
    `reps` draws resamples the seeds, then the test images, with replacement,
    and averages the differences; the interval is its 2.5 and 97.5 percentiles.
    It covers the spread of test images and of seeds; with few seeds the
    seed level is coarse.

    Returns: `{"by_seed": {seed: difference}, "mean", "low", "high", "seeds",
        "images"}` (fractions; `mean` over every seed and image), or None where no
        seed has both arms' per-image results for `metric`.
    """
    at = {(c["activation"], c["seed"]): c for c in cells if c["objective"] == objective}

    def hits(a, s):
        per_image = at.get((a, s), {}).get("per_image") or {}
        return None if per_image.get(metric) is None else unpack(per_image[metric])

    seeds = sorted(s for a, s in at if a == arm and hits(arm, s) is not None
                   and hits(other, s) is not None)
    if not seeds:
        return None
    diffs = np.stack([hits(arm, s).astype(np.int8) - hits(other, s) for s in seeds])
    rng = np.random.default_rng(seed)
    boot = [diffs[rng.integers(0, len(seeds), len(seeds))][:, rng.integers(
        0, diffs.shape[1], diffs.shape[1])].mean() for _ in range(reps)]
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"by_seed": {s: float(d.mean()) for s, d in zip(seeds, diffs)},
            "mean": float(diffs.mean()), "low": float(low), "high": float(high),
            "seeds": len(seeds), "images": int(diffs.shape[1])}
