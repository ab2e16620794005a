"""Cluster descriptions: the shipped presets (YAML files beside this module, each with its sources) or a user file.

A cluster file is a YAML mapping with exactly the keys of :class:`Cluster` (``sources`` and ``notes``
are free text). Bandwidths are per GPU (bytes each GPU sends per second, what all-to-all and ring
collective benchmarks report as algorithm or bus bandwidth), in GB/s (1e9 bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

import yaml

from msmoe_dist.errors import UserError


class ClusterError(UserError):
    """An unknown preset or a cluster file that cannot be used (one line, naming the key)."""


@dataclass(frozen=True)
class Cluster:
    name: str
    device: str  # cuda: plan attention as the flash kernel runs it; cpu: as the CPU kernels do
    gpu_memory_gib: float  # memory per device
    usable_memory_fraction: float  # share of it a training step may use (CUDA context, allocator fragmentation)
    peak_tflops: float  # dense peak of the compute dtype (MFU is against this)
    sustained_tflops: float  # what large GEMMs of a training step sustain
    mem_gbps: float  # memory bandwidth (optimiser step and element-wise ops)
    gpus_per_node: int
    nvlink_a2a_gbps: float  # all-to-all inside a node, per device
    net_a2a_gbps: float  # all-to-all across nodes, per device
    nvlink_allreduce_gbps: float  # ring all-reduce / reduce-scatter bus bandwidth inside a node
    net_allreduce_gbps: float  # the same across nodes
    collective_latency_us: float  # fixed cost of one collective call
    op_overhead_us: float  # eager cost of one operator call (dispatch, kernel launch) that no FLOP count shows
    # Optional (msmoe-bench calibrate measures them on a CPU):
    # fraction of sustained_tflops a matmul reaches by its GEMM size class (the smallest of m, k, n: 16, 32, ...);
    # between classes interpolated in log2, beyond the ends the end value; empty: every matmul at the sustained rate
    gemm_efficiency: dict = field(default_factory=dict)
    elementwise_gbps: float = 0.0  # bytes read + written per second by element-wise ops; 0: mem_gbps
    rng_gelems: float = 0.0  # random numbers drawn per second (dropout masks), in 1e9; 0: as element-wise writes
    sources: str = ""
    notes: str = ""

    def gemm_fraction(self, bucket: int) -> float:
        """The share of the sustained rate a matmul of this size class runs at (see gemm_efficiency)."""
        if not self.gemm_efficiency:
            return 1.0
        pts = sorted((math.log2(int(k)), float(v)) for k, v in self.gemm_efficiency.items())
        x = math.log2(max(bucket, 1))
        if x <= pts[0][0]:
            return pts[0][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if x <= x1:
                return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        return pts[-1][1]


_OPTIONAL = ("gemm_efficiency", "elementwise_gbps", "rng_gelems", "sources", "notes")
_REQUIRED = [f.name for f in fields(Cluster) if f.name not in _OPTIONAL]
_NONNEGATIVE = ("collective_latency_us", "op_overhead_us", "elementwise_gbps", "rng_gelems")
_POSITIVE = [n for n in _REQUIRED if n not in ("name", "device", *_NONNEGATIVE)]


def preset_names() -> list[str]:
    folder = resources.files("msmoe_dist.plan") / "clusters"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def cluster_from_dict(data: object, source: str) -> Cluster:
    """Check every key (missing, unknown, wrong type, out of range) and build the Cluster."""
    if not isinstance(data, dict):
        raise ClusterError(f"{source}: expected a YAML mapping of cluster keys, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in fields(Cluster)})
    if unknown:
        raise ClusterError(f"{source}: unknown key {unknown[0]!r} (expected {', '.join(_REQUIRED)})")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ClusterError(f"{source}: missing key {missing[0]!r}")
    values: dict = {}
    for f in fields(Cluster):
        if f.name not in data:
            continue
        v = data[f.name]
        if f.name in ("name", "device", "sources", "notes"):
            if not isinstance(v, str):
                raise ClusterError(f"{source}: key {f.name!r} must be a string, got {v!r}")
        elif f.name == "gemm_efficiency":
            ok = isinstance(v, dict) and all(
                isinstance(k, int) and k >= 1 and isinstance(x, (int, float)) and 0 < x <= 1 for k, x in v.items()
            )
            if not ok:
                raise ClusterError(
                    f"{source}: key 'gemm_efficiency' must map GEMM sizes (integers >= 1) to fractions in (0, 1], "
                    f"got {v!r}"
                )
            v = {int(k): float(x) for k, x in v.items()}
        elif f.name == "gpus_per_node":
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ClusterError(f"{source}: key 'gpus_per_node' must be an integer >= 1, got {v!r}")
        else:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ClusterError(f"{source}: key {f.name!r} must be a number, got {v!r}")
            v = float(v)
            if f.name in _POSITIVE and v <= 0:
                raise ClusterError(f"{source}: key {f.name!r} must be > 0, got {v}")
            if f.name in _NONNEGATIVE and v < 0:
                raise ClusterError(f"{source}: key {f.name!r} must be >= 0, got {v}")
        values[f.name] = v
    if values["device"] not in ("cuda", "cpu"):
        raise ClusterError(f"{source}: key 'device' must be cuda or cpu, got {values['device']!r}")
    if not 0 < values["usable_memory_fraction"] <= 1:
        frac = values["usable_memory_fraction"]
        raise ClusterError(f"{source}: key 'usable_memory_fraction' must be in (0, 1], got {frac}")
    return Cluster(**values)


def load_cluster(spec: str) -> Cluster:
    """A preset name (h100-ib400, ...) or the path of a YAML file (ends in .yaml/.yml or exists)."""
    if spec.endswith((".yaml", ".yml")) or Path(spec).exists():
        path = Path(spec)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ClusterError(f"--cluster {spec}: cannot read it ({exc.strerror or exc})") from exc
    else:
        if spec not in preset_names():
            raise ClusterError(
                f"unknown cluster preset {spec!r} (expected one of {', '.join(preset_names())}, or a YAML file)"
            )
        text = (resources.files("msmoe_dist.plan") / "clusters" / f"{spec}.yaml").read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise ClusterError(f"--cluster {spec}: not valid YAML ({first})") from exc
    return cluster_from_dict(data, spec)


def cluster_to_yaml(cluster: Cluster) -> str:
    data = {f.name: getattr(cluster, f.name) for f in fields(Cluster)}
    return yaml.safe_dump(data, sort_keys=False, width=110)
