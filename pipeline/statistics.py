"""Intervals and claims at the unit of sampling (docs/method.md section 5).

Images of one prompt are not independent evidence: they share the prompt, and an attack's images
share its prompts and its run. So every estimate here is a ratio of sums over *clusters* (a
prompt's images; an attack run's prompt), and its uncertainty comes from resampling clusters:

- **One concept**: a bootstrap over prompts (whole prompts with all their images). Where every
  prompt is all-0 or all-1 (everything blocked, nothing drawn...), the prompt-level count k of m
  gets the exact Clopper-Pearson interval instead, so no finite sample has a zero-width interval.
- **An average over concepts**: a hierarchical bootstrap, concepts then prompts, so the interval
  carries the concepts' spread, not only each concept's sampling error.
- **Few units** (4 test prompts of a character, 6 concepts): the percentile interval undercovers,
  so it is *expanded* (Hesterberg 2015, "What teachers should know about the bootstrap"): the tail
  level is the normal tail of sqrt(n/(n-1)) * t_{n-1}, which equals the t interval's width on a
  normal mean.
- **Paired differences**: estimates whose clusters are the same prompts are resampled with the
  same draws (the draws are seeded by the cluster labels), so A - B is paired wherever A and B
  saw the same prompts and seeds, and independent where they did not (two adapted attacks' own
  prompts). Its p-value is the difference over its bootstrap standard error against t with
  (units - 1) degrees of freedom; a family of such claims is controlled by Holm (or
  Benjamini-Hochberg) at ``statistics.family_rate`` (statsmodels).

An :class:`Estimate` keeps its bootstrap draws, so averages, worst cases and differences are
computed draw by draw and stay consistent with the intervals they come from.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from pipeline.schema import Statistics


@dataclass(frozen=True)
class Estimate:
    """A ratio of sums over clusters, with ``draws`` (its bootstrap replicates), ``units`` (the
    clusters, or concepts, resampled at the top level), ``n`` (images) and, where every cluster
    is all-0 or all-1, ``exact`` = (k, m): the prompt-level count."""

    value: float
    draws: np.ndarray
    units: int
    n: int
    exact: tuple[float, int] | None = None

    def interval(self, confidence: float) -> dict:
        """``{"value", "low", "high", "n", "clusters", "method"}``: exact (Clopper-Pearson on
        the prompt-level count) where every cluster is 0 or 1 (a single prompt: its share as
        one trial), else the expanded percentile interval of the draws; bounds None where
        nothing can be said (no unit, or one unit of a mean outside [0, 1])."""
        out = {"value": _number(self.value), "low": None, "high": None, "n": self.n,
               "clusters": self.units, "method": "none"}
        if self.n == 0 or not np.isfinite(self.value):
            out["value"] = None
            return out
        if self.exact is not None:
            low, high = clopper_pearson(*self.exact, confidence)
            out.update(low=low, high=high, method="exact")
            return out
        finite = self.draws[np.isfinite(self.draws)]
        if self.units < 2 or finite.size == 0:
            if self.units == 1 and 0 <= self.value <= 1:  # one prompt: one trial of its share
                out.update(zip(("low", "high"), clopper_pearson(self.value, 1, confidence)),
                           method="exact")
            return out
        alpha = expanded_alpha(1 - confidence, self.units)
        low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
        # the percentile interval of a ratio can miss its point by rounding: widen to it
        out.update(low=float(min(low, self.value)), high=float(max(high, self.value)),
                   method="bootstrap")
        return out


def _number(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def clopper_pearson(k: float, m: int, confidence: float) -> tuple[float, float]:
    """The exact interval of a binomial share k of m (k may be fractional: an equal share of
    every cluster)."""
    from scipy.stats import beta

    alpha = 1 - confidence
    low = 0.0 if k <= 0 else float(beta.ppf(alpha / 2, k, m - k + 1))
    high = 1.0 if k >= m else float(beta.ppf(1 - alpha / 2, k + 1, m - k))
    return low, high


def expanded_alpha(alpha: float, units: int) -> float:
    """The tail level of the expanded percentile interval for ``units`` resampled units."""
    from scipy.stats import norm, t

    return float(2 * norm.sf(np.sqrt(units / (units - 1)) * t.ppf(1 - alpha / 2, units - 1)))


def _seed(stats: Statistics, *keys: str) -> np.random.Generator:
    """A generator fixed by the seed and the labels: the same clusters always get the same draws
    (pairing), whichever estimate asks first."""
    digest = hashlib.sha256("\x1f".join(keys).encode()).digest()
    return np.random.default_rng([stats.seed, int.from_bytes(digest[:8], "little")])


def estimate(values: Sequence[float], clusters: Sequence, stats: Statistics,
             denominators: Sequence[float] | None = None) -> Estimate:
    """Sum of ``values`` over sum of ``denominators`` (default: one per image, a mean), with
    ``stats.resamples`` bootstrap draws over the distinct ``clusters``."""
    values = np.asarray(values, float)
    counts = np.ones_like(values) if denominators is None else np.asarray(denominators, float)
    labels = np.asarray([str(c) for c in clusters], object)
    if values.size == 0:
        return Estimate(float("nan"), np.full(stats.resamples, np.nan), 0, 0)
    names, index = np.unique(labels, return_inverse=True)
    sums = np.bincount(index, weights=values, minlength=len(names))
    totals = np.bincount(index, weights=counts, minlength=len(names))
    picks = _seed(stats, *names).integers(0, len(names), (stats.resamples, len(names)))
    with np.errstate(invalid="ignore", divide="ignore"):
        draws = sums[picks].sum(1) / totals[picks].sum(1)
        means = sums / totals
    exact = None
    if denominators is None and np.all((means == 0) | (means == 1)):
        exact = (float(means.sum()), len(names))
    return Estimate(float(sums.sum() / counts.sum()), draws, len(names), int(values.size), exact)


def rate(values: Sequence[float], clusters: Sequence, stats: Statistics,
         denominators: Sequence[float] | None = None) -> dict:
    """:func:`estimate`'s interval at ``stats.confidence``: what a stage writes for one rate."""
    return estimate(values, clusters, stats, denominators).interval(stats.confidence)


def average(estimates: dict[str, Estimate], stats: Statistics) -> Estimate:
    """The mean over concepts (``estimates``: concept -> its estimate), by a hierarchical
    bootstrap: concepts resampled, then each drawn concept's own prompt-level draw. Where every
    concept's every cluster is all-0 (or all-1), the exact bound of the pooled count. A single
    concept is returned as it is (its prompt-level interval): no spread between concepts can be
    estimated from one."""
    names = sorted(name for name, e in estimates.items() if e.n and np.isfinite(e.value))
    if not names:
        return Estimate(float("nan"), np.full(stats.resamples, np.nan), 0, 0)
    if len(names) == 1:  # one concept says nothing of concepts in general: it is its own average
        return estimates[names[0]]
    table = np.stack([estimates[name].draws for name in names])           # concepts x draws
    picks = _seed(stats, "concepts", *names).integers(0, len(names), (stats.resamples, len(names)))
    draws = table[picks, np.arange(stats.resamples)[:, None]].mean(1)
    exacts = [estimates[name].exact for name in names]
    exact = None
    if all(e is not None for e in exacts) and len({e[0] / e[1] for e in exacts}) == 1 \
            and exacts[0][0] / exacts[0][1] in (0.0, 1.0):
        exact = (sum(e[0] for e in exacts), sum(e[1] for e in exacts))
    return Estimate(float(np.mean([estimates[name].value for name in names])), draws,
                    len(names), sum(estimates[name].n for name in names), exact)


def worst(estimates: list[Estimate], higher_is_worse: bool = True) -> Estimate:
    """The worst of several estimates (e.g. every adapted attack on one CRT), draw by draw. Where
    all are exact, the bound is the widest of theirs (one run's count, the worst run)."""
    pick = np.fmax if higher_is_worse else np.fmin
    live = [e for e in estimates if e.n]
    if not live:
        return Estimate(float("nan"), np.full(len(estimates[0].draws), np.nan), 0, 0)
    draws = live[0].draws
    for e in live[1:]:
        draws = pick(draws, e.draws)
    chosen = (max if higher_is_worse else min)(live, key=lambda e: e.value)
    exact = None
    if all(e.exact is not None for e in live):
        exact = (max if higher_is_worse else min)(
            (e.exact for e in live), key=lambda k: k[0] / k[1])
    return Estimate(chosen.value, draws, min(e.units for e in live), sum(e.n for e in live),
                    exact)


def difference(a: Estimate, b: Estimate) -> Estimate:
    """A - B, draw by draw: paired where A and B were resampled on the same clusters."""
    return Estimate(a.value - b.value, a.draws - b.draws, min(a.units, b.units),
                    min(a.n, b.n))


def p_value(diff: Estimate) -> float:
    """Two-sided p-value of "the difference is 0": the difference over its bootstrap standard
    error, against Student's t with (units - 1) degrees of freedom (the expanded interval's
    reference), so that a family of many claims can be controlled beyond the resolution of the
    draws. No spread at all: 0 where the difference is not 0, else 1."""
    from scipy.stats import t

    draws = diff.draws[np.isfinite(diff.draws)]
    if draws.size < 2 or not np.isfinite(diff.value):
        return 1.0
    spread = float(draws.std(ddof=1))
    if spread == 0.0:
        return 0.0 if diff.value != 0 else 1.0
    return float(2 * t.sf(abs(diff.value) / spread, max(diff.units - 1, 1)))


def controlled(p_values: Sequence[float], stats: Statistics) -> tuple[np.ndarray, np.ndarray]:
    """Which claims of one family survive ``stats.correction`` at ``stats.family_rate``, and
    their adjusted p-values."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, float)
    if p.size == 0:
        return np.zeros(0, bool), np.zeros(0)
    reject, adjusted, _, _ = multipletests(p, alpha=stats.family_rate, method=stats.correction)
    return reject, adjusted
