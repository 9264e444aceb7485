"""STAND-IN for the lead's ``pipeline/statistics.py`` (being written on main): only ``rate``, with
the signature the everyday condition is written against. On merging main, take main's file.

A rate is the mean of per-image ``values`` (1/0 for a share, or ratios) with a percentile
bootstrap interval over ``clusters`` (whole prompts resampled: the images of one prompt are not
independent), exact bounds where every value agrees (Clopper-Pearson over the clusters for a share
of all 0 or all 1)."""
from __future__ import annotations

import numpy as np


def rate(values, clusters, stats) -> dict:
    """``{"value", "low", "high", "n", "clusters", "method"}`` of ``values`` clustered by
    ``clusters`` (one label per value); ``stats``: ``params.statistics`` (confidence, resamples,
    seed). No value: every number None. One cluster and disagreeing values: no interval."""
    values = np.asarray(values, float)
    clusters = np.asarray(clusters, object)
    if values.shape != clusters.shape:
        raise ValueError(f"{values.size} values but {clusters.size} cluster labels")
    if values.size == 0:
        return {"value": None, "low": None, "high": None, "n": 0, "clusters": 0, "method": "none"}
    names, index = np.unique(clusters.astype(str), return_inverse=True)
    k = len(names)
    value = float(values.mean())
    out = {"value": value, "low": None, "high": None, "n": int(values.size), "clusters": int(k)}
    alpha = 1 - stats.confidence
    if np.all(values == values[0]):
        low = high = value
        if value in (0.0, 1.0):  # a share every cluster agrees on: Clopper-Pearson over clusters
            bound = (alpha / 2) ** (1 / k)
            low, high = (0.0, 1 - bound) if value == 0.0 else (bound, 1.0)
        return {**out, "low": float(low), "high": float(high), "method": "exact"}
    if k < 2:
        return {**out, "method": "none"}
    sums = np.bincount(index, weights=values, minlength=k)
    counts = np.bincount(index, minlength=k).astype(float)
    draws = np.random.default_rng(stats.seed).integers(0, k, (stats.resamples, k))
    means = sums[draws].sum(1) / counts[draws].sum(1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {**out, "low": float(min(low, value)), "high": float(max(high, value)),
            "method": "cluster_bootstrap"}
