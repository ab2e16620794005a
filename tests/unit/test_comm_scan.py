"""Every collective of the package goes through msmoe_dist.parallel.comm (NCCL takes only CUDA tensors,
and comm is where a tensor is placed on the group's device). This scans the source for the others."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "msmoe_dist"
COMM = PACKAGE / "parallel" / "comm.py"

COLLECTIVES = {
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "monitored_barrier",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
}

# Files whose owner has yet to switch (path relative to the package: the reason). The test fails when an
# entry no longer calls a collective, so the list only shrinks.
PENDING: dict[str, str] = {}


def _dist_aliases(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Names bound to torch.distributed (modules) and to its collectives (functions) in one file."""
    modules, functions = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed" and a.asname:
                    modules.add(a.asname)
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                if node.module == "torch" and a.name == "distributed":
                    modules.add(a.asname or a.name)
                elif (
                    node.module in ("torch.distributed", "torch.distributed.distributed_c10d") and a.name in COLLECTIVES
                ):
                    functions.add(a.asname or a.name)
    return modules, functions


def _is_torch_distributed(node: ast.expr, modules: set[str]) -> bool:
    if isinstance(node, ast.Name):
        return node.id in modules
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "distributed"
        and isinstance(node.value, ast.Name)
        and node.value.id == "torch"
    )


def direct_collectives(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    """`file:line name` of every torch.distributed collective called in `path` (named relative to `root`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules, functions = _dist_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and _is_torch_distributed(f.value, modules):
            found.append(f"{path.relative_to(root)}:{node.lineno} {f.attr}")
        elif isinstance(f, ast.Name) and f.id in functions:
            found.append(f"{path.relative_to(root)}:{node.lineno} {f.id}")
    return found


def test_the_scan_finds_every_spelling(tmp_path):
    src = tmp_path / "probe.py"
    src.write_text(
        "import torch\nimport torch.distributed as dist\nfrom torch import distributed as d2\n"
        "from torch.distributed import all_reduce as ar\n"
        "dist.all_reduce(t)\nd2.barrier()\ntorch.distributed.broadcast(t, 0)\nar(t)\n"
        "dist.get_rank()\nx.all_reduce(t)\n"
    )
    hits = [h.split(" ")[1] for h in direct_collectives(src, tmp_path)]
    assert sorted(hits) == ["all_reduce", "ar", "barrier", "broadcast"]


def test_no_collective_bypasses_the_comm_module():
    offenders, pending_seen = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == COMM:
            continue
        rel = str(path.relative_to(PACKAGE))
        hits = direct_collectives(path)
        if rel in PENDING:
            if hits:
                pending_seen.add(rel)
            continue
        offenders += hits
    assert not offenders, (
        "torch.distributed collectives called outside msmoe_dist/parallel/comm.py (use comm.all_reduce, "
        "comm.all_to_all_single, comm.all_gather, comm.broadcast, comm.barrier):\n" + "\n".join(offenders)
    )
    stale = set(PENDING) - pending_seen
    assert not stale, f"no longer call a collective directly; remove them from PENDING: {sorted(stale)}"
