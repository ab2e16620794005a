"""moe.overlap_chunks without a process group: the chunk plan against a host loop, the asynchronous all-to-all
of parallel/comm.py (placed, named, counted), and the configuration's checks (one-line errors, exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from msmoe_dist.config.errors import ConfigError
from msmoe_dist.config.loader import load_config
from msmoe_dist.config.model_spec import ModelSpec
from msmoe_dist.parallel import CommStats, comm
from msmoe_dist.parallel.comm import CollectiveError, CommBackend, using_backend
from msmoe_dist.parallel.overlap import build_plan, chunk_sizes

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_chunk_sizes_cut_rows_into_near_equal_pieces():
    assert chunk_sizes(7, 3) == [3, 2, 2]
    assert chunk_sizes(2, 3) == [1, 1, 0]  # fewer rows than chunks: empty pieces, still a valid exchange
    assert chunk_sizes(0, 2) == [0, 0]
    assert sum(chunk_sizes(1001, 7)) == 1001


def test_plan_against_a_host_loop():
    send_PL = [[3, 0, 2], [1, 4, 5]]  # P = 2 destinations, L = 3 local experts each
    recv_PL = [[2, 2, 0], [5, 1, 3]]
    plan = build_plan(send_PL, recv_PL, 2, torch.device("cpu"))
    # order: chunk-major, then destination, local expert, row; piece 0 of a block first
    blocks, start = {}, 0
    for p in range(2):
        for lc in range(3):
            blocks[p, lc] = list(range(start, start + send_PL[p][lc]))
            start += send_PL[p][lc]
    expected = []
    for c in range(2):
        for p in range(2):
            for lc in range(3):
                rows, sizes = blocks[p, lc], chunk_sizes(len(blocks[p, lc]), 2)
                expected += rows[sum(sizes[:c]) : sum(sizes[: c + 1])]
    assert plan.order.tolist() == expected
    assert [c.send_splits for c in plan.chunks] == [[2 + 0 + 1, 1 + 2 + 3], [1 + 0 + 1, 0 + 2 + 2]]
    assert [c.recv_splits for c in plan.chunks] == [[1 + 1 + 0, 3 + 1 + 2], [1 + 1 + 0, 2 + 0 + 1]]
    assert [c.expert_rows for c in plan.chunks] == [[1 + 3, 1 + 1, 0 + 2], [1 + 2, 1 + 0, 0 + 1]]
    # chunk 0 received (source, expert): (0,0)x1 (0,1)x1 (1,0)x3 (1,1)x1 (1,2)x2 -> expert-major
    assert plan.chunks[0].regroup.tolist() == [0, 2, 3, 4, 1, 5, 6, 7]
    for c in plan.chunks:
        assert torch.equal(c.regroup[c.inverse], torch.arange(c.regroup.numel()))


class OneRank(CommBackend):
    """A world of one on a pretend device; records what it is handed; may fail like a dead peer."""

    def __init__(self, fail=None):
        self.handed, self.fail = [], fail

    def device(self, group=None):
        return torch.device("meta")  # never the caller's device: every tensor must be placed

    def to_comm(self, t, device):
        self.handed.append(("to", device))
        return t.clone()

    def from_comm(self, t, device):
        self.handed.append(("from", device))
        return t.clone()

    def rank(self):
        return 0

    def all_to_all_single(self, out, inp, out_splits, in_splits, group):
        if self.fail is not None:
            raise self.fail
        out.copy_(inp)


def test_async_all_to_all_is_placed_counted_and_named():
    stats, backend = CommStats(), OneRank()
    x = torch.arange(6.0).view(3, 2)
    with using_backend(backend):
        pending = comm.all_to_all_single_async(x, [3], [3], name="chunk", stats=stats)
        y = pending.wait()
        assert pending.wait() is y  # waiting twice hands back the same result
    assert torch.equal(y, x) and backend.handed == [("to", torch.device("meta")), ("from", x.device)]
    assert stats["chunk"].calls == 1 and stats["chunk"].bytes == 6 * 4
    with using_backend(OneRank(RuntimeError("Connection closed by peer"))):
        with pytest.raises(CollectiveError, match="'chunk' failed on rank 0: Connection closed by peer"):
            comm.all_to_all_single_async(x, [3], [3], name="chunk")


LM = ["data.batch_size=2", "data.seq_len=8", "moe.top_k=2", "moe.num_experts=4"]


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["moe.overlap_chunks=0"], r"moe.overlap_chunks.*expected an integer in \[1, 64\]"),
        (["moe.overlap_chunks=65", "parallel.ep_size=2"], r"expected an integer in \[1, 64\]"),
        # 2 * 8 * 2 / 2 = 16 rows per peer on average: 17 chunks would leave most of them empty
        (["moe.overlap_chunks=17", "parallel.ep_size=2"], "more chunks than the 16 rows a rank sends"),
    ],
)
def test_bad_overlap_chunks_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [*LM, *overrides])


def test_overlap_chunks_within_range_load_and_warn_without_expert_parallelism():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(None, [*LM, "moe.overlap_chunks=16", "parallel.ep_size=2"]).moe.overlap_chunks == 16
    with pytest.warns(UserWarning, match="no effect with parallel.ep_size=1"):
        load_config(None, [*LM, "moe.overlap_chunks=2"])


def test_overlap_chunks_is_not_part_of_the_network():
    saved = ModelSpec.of(load_config(None, LM)).as_dict()
    now = ModelSpec.of(load_config(None, [*LM, "moe.overlap_chunks=4", "parallel.ep_size=2"]))
    assert now.mismatches(saved) == []


def test_train_refuses_zero_chunks_in_one_line_exit_2(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "msmoe_dist.cli", "train", "moe.overlap_chunks=0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "moe.overlap_chunks" in lines[0], proc.stderr
