"""The report of `msmoe-bench compare`: results.md/results.json (sweep.md/sweep.json with --sweep) and PNGs.

Everything is read back from the cells' run directories, so the report of a resumed or partly finished
grid is the same as that of an uninterrupted one, and cells that have not finished are listed as missing.

Per cell: the validation-perplexity curve (`val.ppl` rows of metrics.jsonl: the trainer's periodic
evaluation on train.eval_batches batches), its final and best value, and msmoe-eval's clean and attacked
perplexity of each scored split (eval.json). Per row (a variant at one sweep point, seeds pooled): mean ±
sample std. Against the baseline (variant none, same seed, same non-momentum sweep values): the paired
difference per seed, its mean and a 95 % t interval (df = seeds - 1).

The norm-ordered expert-selection histogram (MomentumSMoE, arXiv 2410.14574, Fig. 5): at each logged
training step the trainer records, per MoE layer, how many token-to-expert assignments each expert
received with the experts sorted by the mean L2 norm of their outputs in that step, largest first
(`moe.layerI.selection_by_norm`, moe/stats.py). Here those counts are summed over the logged steps of
the last quarter of training and over seeds, and normalised to fractions: bar r is the share of the
assignments that went to the expert with the r-th largest output norm.
"""

from __future__ import annotations

import json
import platform
import re
import sys
import time
from pathlib import Path

from msmoe_dist.bench.compare_stats import mean_std, paired_difference, selection_fractions
from msmoe_dist.io import atomic_write
from msmoe_dist.plots import read_rows

BASELINE = "none"  # the variant every other one is compared with
_SEL = re.compile(r"moe\.layer(\d+)\.selection_by_norm")
SELECTION_TAIL = 0.25  # the last quarter of training feeds the selection histogram


def read_cell(run_dir: Path, max_steps: int) -> dict | None:
    """The figures of one finished cell (its eval.json at the final step), or None when it has not finished."""
    try:
        ev = json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    if ev.get("step") != max_steps:
        return None
    curve: list[list[float]] = []
    selection: dict[int, list[int]] = {}
    for row in read_rows(run_dir):  # the metrics.jsonl reader msmoe-plot uses (one-line error on a bad line)
        if "val.ppl" in row:
            curve.append([row["step"], row["val.ppl"]])
        if row.get("step", 0) > (1 - SELECTION_TAIL) * max_steps:
            for key, counts in row.items():
                m = _SEL.fullmatch(key)
                if m and isinstance(counts, list):
                    acc = selection.setdefault(int(m.group(1)), [0] * len(counts))
                    selection[int(m.group(1))] = [a + c for a, c in zip(acc, counts)]
    metrics: dict[str, float] = {}
    if curve:
        metrics["final_valid_ppl"] = curve[-1][1]
        metrics["best_valid_ppl"] = min(p for _, p in curve)
    for key, val in ev.items():
        if re.fullmatch(r"(valid|test)(_attacked)?_ppl", key):
            metrics[key] = val
    return {"metrics": metrics, "curve": curve, "selection": {str(k): v for k, v in sorted(selection.items())}}


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _baseline_label(cell) -> str:
    return "/".join([BASELINE] + [f"{k}={v}" for k, v in cell.point if not k.startswith("momentum.")])


def summarise(cells: list, per_cell: dict[str, dict | None]) -> dict:
    """Rows (variant + sweep point): per-seed values, mean ± std, and paired differences to the baseline."""
    rows: dict[str, dict] = {}
    for cell in cells:
        row = rows.setdefault(cell.label, {"variant": cell.variant, "point": dict(cell.point), "seeds": {}})
        row["baseline"] = _baseline_label(cell)
        data = per_cell.get(cell.name)
        if data is not None:
            row["seeds"][str(cell.seed)] = data["metrics"]
    for label, row in rows.items():
        names = sorted({k for m in row["seeds"].values() for k in m})
        row["mean_std"] = {}
        for name in names:
            vals = [m[name] for m in row["seeds"].values() if name in m]
            mean, std = mean_std(vals)
            row["mean_std"][name] = {"n": len(vals), "mean": mean, "std": std}
        base = rows.get(row["baseline"])
        row["vs_baseline"] = {}
        if base is None or label == row["baseline"]:
            continue
        common = sorted(set(row["seeds"]) & set(base["seeds"]), key=int)
        for name in names:
            pairs = [(row["seeds"][s][name], base["seeds"][s][name]) for s in common if name in base["seeds"][s]]
            if pairs:
                diff = paired_difference([p[0] for p in pairs], [p[1] for p in pairs])
                diff["seeds"] = [int(s) for s in common]
                row["vs_baseline"][name] = diff
    return rows


METRIC_NAMES = {
    "final_valid_ppl": "final valid ppl",
    "best_valid_ppl": "best valid ppl",
    "valid_ppl": "valid ppl (eval)",
    "valid_attacked_ppl": "valid attacked ppl",
    "test_ppl": "test ppl",
    "test_attacked_ppl": "test attacked ppl",
}


def _metric_order(rows: dict) -> list[str]:
    have = {k for r in rows.values() for k in r["mean_std"]}
    return [k for k in METRIC_NAMES if k in have]


def render_markdown(result: dict) -> str:
    rows, metrics = result["rows"], _metric_order(result["rows"])
    out = [
        "# msmoe-bench compare",
        "",
        f"{result['date']}, {result['machine']}. Command: `{result['command']}`",
        "",
        f"Cells finished: {len(result['cells']) - len(result['missing'])} of {len(result['cells'])}"
        + (f"; missing: {', '.join(result['missing'])}" if result["missing"] else "."),
        f"Attacked perplexity: word-swap attack at rate {result['attack_rate']} (msmoe-eval --attack).",
        "",
        "## Per run",
        "",
        "| run | " + " | ".join(METRIC_NAMES[m] for m in metrics) + " |",
        "| --- |" + " --- |" * len(metrics),
    ]
    for name, cell in result["cells"].items():
        vals = (cell or {}).get("metrics", {})
        out.append(f"| {name} | " + " | ".join(_fmt(vals.get(m)) for m in metrics) + " |")
    out += ["", "## Per variant (mean ± sample std over seeds)", ""]
    out += ["| variant | seeds | " + " | ".join(METRIC_NAMES[m] for m in metrics) + " |"]
    out += ["| --- | --- |" + " --- |" * len(metrics)]
    for label, row in rows.items():
        ms = row["mean_std"]
        n = max((v["n"] for v in ms.values()), default=0)
        cells = [f"{_fmt(ms[m]['mean'])} ± {_fmt(ms[m]['std'])}" if m in ms else "-" for m in metrics]
        out.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    out += ["", "## Paired difference to the baseline (variant − none, same seed; mean [95 % t interval])", ""]
    out += ["Negative is better (lower perplexity). An interval that contains 0 shows no difference at this n.", ""]
    out += ["| variant | pairs | " + " | ".join(METRIC_NAMES[m] for m in metrics) + " |"]
    out += ["| --- | --- |" + " --- |" * len(metrics)]
    for label, row in rows.items():
        vs = row["vs_baseline"]
        if not vs:
            continue
        n = max(v["n"] for v in vs.values())
        cells = []
        for m in metrics:
            if m not in vs:
                cells.append("-")
            elif vs[m]["ci95"] is None:
                cells.append(f"{_fmt(vs[m]['mean'])} (n=1, no interval)")
            else:
                lo, hi = vs[m]["ci95"]
                cells.append(f"{_fmt(vs[m]['mean'])} [{_fmt(lo)}, {_fmt(hi)}]")
        out.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    if result.get("pivot"):
        out += ["", result["pivot"]]
    if result.get("plots"):
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in result["plots"]]
    if result.get("plot_note"):
        out += ["", result["plot_note"]]
    return "\n".join(out) + "\n"


def pivot_table(rows: dict, sweep: list[tuple[str, list[str]]], metric: str = "final_valid_ppl") -> str:
    """For a two-key sweep: a table of the metric's mean with the first key down and the second across."""
    if len(sweep) != 2:
        return ""
    (k1, v1), (k2, v2) = sweep
    variants = sorted({r["variant"] for r in rows.values() if k1 in r["point"] and k2 in r["point"]})
    parts = []
    for variant in variants:
        lines = [f"### {variant}: {METRIC_NAMES[metric]} ({k1} down, {k2} across)", ""]
        lines += [f"| {k1} \\ {k2} | " + " | ".join(v2) + " |", "| --- |" + " --- |" * len(v2)]
        for a in v1:
            vals = []
            for b in v2:
                row = rows.get("/".join([variant, f"{k1}={a}", f"{k2}={b}"]))
                ms = (row or {}).get("mean_std", {}).get(metric)
                vals.append(_fmt(ms["mean"]) if ms else "-")
            lines.append(f"| {a} | " + " | ".join(vals) + " |")
        parts.append("\n".join(lines))
    base = [r for r in rows.values() if not r["point"] and r["variant"] == "none"]
    if base and metric in base[0]["mean_std"]:
        parts.append(f"Baseline none: {METRIC_NAMES[metric]} {_fmt(base[0]['mean_std'][metric]['mean'])}.")
    return "\n\n".join(parts)


def write_report(
    out: Path, cells: list, steps: dict[str, int], sweep: list, command: str, plots: bool = True, log=print
) -> dict:
    """Writes results.md/.json (sweep.md/.json when ``sweep``) and the PNGs under ``out``; returns paths."""
    per_cell = {c.name: read_cell(out / "runs" / c.name, steps[c.name]) for c in cells}
    rows = summarise(cells, per_cell)
    stem = "sweep" if sweep else "results"
    result: dict = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()}, {platform.processor() or platform.machine()}",
        "attack_rate": _attack_rate(out, cells),
        "cells": {c.name: per_cell[c.name] for c in cells},
        "missing": [c.name for c in cells if per_cell[c.name] is None],
        "rows": rows,
        "plots": [],
    }
    if sweep:
        result["pivot"] = pivot_table(rows, sweep)
    if plots:
        try:
            from msmoe_dist.bench.compare_plots import plot_curves, plot_selection
        except ImportError as exc:  # matplotlib missing: the tables are still written
            result["plot_note"] = f"No PNGs: {exc} (pip install matplotlib)."
            log(f"msmoe-bench compare: no PNGs: {exc}", file=sys.stderr)
        else:
            result["plots"].append(plot_curves(out / f"{stem}_valid_ppl.png", cells, per_cell).name)
            sel = plot_selection(out / f"{stem}_selection_by_norm.png", cells, per_cell)
            if sel is not None:
                result["plots"].append(sel.name)
    result["selection_fractions"] = selection_fractions(cells, per_cell)
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    atomic_write(js, json.dumps(result, indent=1) + "\n")
    atomic_write(md, render_markdown(result))
    return {"markdown": str(md), "json": str(js), "missing": result["missing"]}


def _attack_rate(out: Path, cells: list) -> float | None:
    for c in cells:
        try:
            return json.loads((out / "runs" / c.name / "eval.json").read_text()).get("attack_rate")
        except (OSError, ValueError):
            continue
    return None
