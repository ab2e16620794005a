"""--plot DIR: predicted step time and memory per rank against GPU count for each EP degree, and the
step-time breakdown as stacked bars (matplotlib, a dependency of the package)."""

from __future__ import annotations

from pathlib import Path

from msmoe_dist.config.schema import Config
from msmoe_dist.plan.cluster import Cluster
from msmoe_dist.plan.search import GIB, CensusCache, PlanError, divisors, search


def check_plotting(folder: str) -> None:
    """Before any work: matplotlib importable and the folder writable (PlanError otherwise)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PlanError("--plot needs matplotlib (pip install matplotlib)") from exc
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise PlanError(f"--plot {folder}: exists and is not a directory")


def write_plots(
    folder: str, cache: CensusCache, cfg: Config, cluster: Cluster, imbalance: float, gpus: tuple[int, ...]
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    eps = [e for e in divisors(cfg.moe.num_experts) if e <= max(gpus)]
    step: dict[int, list[tuple[int, float]]] = {e: [] for e in eps}
    mem: dict[int, list[tuple[int, float]]] = {e: [] for e in eps}
    best_per_world = []
    for world in gpus:
        for ep in eps:
            if world % ep:
                continue
            cands = search(cache, cfg, cluster, world, imbalance, ep)
            fitting = [c for c in cands if c.fits]
            if fitting:
                step[ep].append((world, fitting[0].time.serial * 1e3))
                mem[ep].append((world, fitting[0].memory.peak / GIB))
        every = [c for c in search(cache, cfg, cluster, world, imbalance) if c.fits]
        if every:
            best_per_world.append((world, every[0]))
    written = []
    for name, data, ylabel in (("step_time", step, "step time (ms, no overlap)"), ("memory", mem, "peak GiB per rank")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for ep, pts in data.items():
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"ep_size {ep}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"GPUs ({cluster.name})")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{Path(str(cfg.train.run_dir)).name}: best fitting configuration per EP degree")
        if name == "memory":
            ax.axhline(cluster.gpu_memory_gib * cluster.usable_memory_fraction, color="grey", ls="--", label="usable")
        ax.legend(fontsize=8)
        path = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    parts = ("compute", "memory_ops", "all_to_all", "grad_reduce", "optimizer")
    bottom = [0.0] * len(best_per_world)
    labels = [f"{w}\nep{c.setting.ep_size}" for w, c in best_per_world]
    for part in parts:
        vals = [getattr(c.time, part) * 1e3 for _, c in best_per_world]
        ax.bar(labels, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("ms per step (no overlap)")
    ax.set_xlabel("GPUs, best EP degree")
    ax.set_title("step-time breakdown of the fastest fitting configuration")
    ax.legend(fontsize=8)
    path = out / "breakdown.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))
    return written
