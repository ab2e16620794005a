"""Statistics of `msmoe-bench compare`: mean ± std over seeds and paired differences with a t interval.

No scipy: the two-sided 95 % Student-t quantiles are tabulated for df 1..30 (the usual printed table,
3 decimals) and a Cornish-Fisher expansion of the normal quantile gives them beyond (error < 1e-3).
Also the aggregation of the norm-ordered expert-selection counts (see compare_report).
"""

from __future__ import annotations

import math

# t_{0.975, df} for df = 1..30.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (the half-width factor of a 95 % CI)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def paired_difference(values: list[float], baseline: list[float]) -> dict:
    """``values[i] - baseline[i]`` over paired seeds: mean, std, and the 95 % t interval of the mean.

    With one pair there is no interval (``ci`` None)."""
    if len(values) != len(baseline) or not values:
        raise ValueError("paired difference needs the same non-zero number of values on both sides")
    diffs = [v - b for v, b in zip(values, baseline)]
    mean, std = mean_std(diffs)
    n = len(diffs)
    if std is None:
        return {"n": n, "mean": mean, "std": None, "ci95": None, "diffs": diffs}
    half = t975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half], "diffs": diffs}


def selection_fractions(cells: list, per_cell: dict[str, dict | None]) -> dict[str, dict[str, list[float]]]:
    """Per row and MoE layer: the norm-ordered selection counts summed over seeds, as fractions."""
    sums: dict[str, dict[str, list[int]]] = {}
    for cell in cells:
        data = per_cell.get(cell.name)
        if data is None:
            continue
        for layer, counts in data["selection"].items():
            acc = sums.setdefault(cell.label, {}).setdefault(layer, [0] * len(counts))
            sums[cell.label][layer] = [a + c for a, c in zip(acc, counts)]
    return {
        label: {layer: [c / max(sum(counts), 1) for c in counts] for layer, counts in layers.items()}
        for label, layers in sums.items()
    }
