"""msmoe-bench gpu-check (launch/gpu_check.sh) on a machine without a GPU: the dry run, the
"no CUDA" exit, the orchestration (a result per check in the JSON even when one fails or times out),
and the checks themselves on the CPU at tiny sizes (--device cpu --small, a test-only mode)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msmoe_dist.bench import gpu_check as gc

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "gpu_check.sh"


def _args(tmp_path: Path, **kw) -> argparse.Namespace:
    base = {
        "out": str(tmp_path / "gpu_check.json"),
        "work": str(tmp_path / "work"),
        "only": None,
        "budget_s": 450.0,
        "peak_tflops": None,
        "dry_run": False,
        "device": "cpu",
        "small": True,
    }
    return argparse.Namespace(**{**base, **kw})


def test_dry_run_lists_every_check_and_runs_nothing(tmp_path):
    res = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path / "g.json")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert res.returncode == 0, res.stderr
    for check in gc.CHECKS:
        assert f"  {check.name} " in res.stdout, check.name
        assert f"--child {check.name} " in res.stdout
    assert "--nproc_per_node 2" in res.stdout  # the EP-2 check goes under torchrun
    assert not (tmp_path / "g.json").exists()


def test_only_selects_by_name_or_item_letter():
    assert [c.name for c in gc.select("c")] == ["c_full", "c_chunked", "c_adaptive"]
    assert [c.name for c in gc.select("a,d_fp16")] == ["a", "d_fp16"]
    assert [c.name for c in gc.select("d")] == ["d_bf16", "d_fp16", "d_ep2"]
    with pytest.raises(SystemExit, match="unknown check"):
        gc.select("z")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_one_line_and_exit_2(tmp_path):
    res = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(tmp_path / "g.json")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert res.returncode == 2
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], lines
    assert not (tmp_path / "g.json").exists()


def test_every_result_is_written_even_after_a_failure(tmp_path, monkeypatch, capsys):
    """The orchestration alone: the JSON holds each check's result as soon as it finishes."""
    seen: list[str] = []

    def fake_run_one(check, args, work, limit_s):
        on_disk = json.loads(Path(args.out).read_text())["checks"] if Path(args.out).exists() else {}
        assert list(on_disk) == seen  # every earlier result is already in the file
        seen.append(check.name)
        if check.name == "b":
            return {"status": "error", "error": "RuntimeError: boom"}
        return {"status": "pass"}

    monkeypatch.setattr(gc, "run_one", fake_run_one)
    rc = gc.run_gpu_check(_args(tmp_path, only="a,b,e"))
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 1 and report["passed"] is False
    # "b" selects item (b) at one GPU and at EP 2 (b_ep2)
    assert {n: r["status"] for n, r in report["checks"].items()} == {
        "a": "pass",
        "b": "error",
        "e": "pass",
        "b_ep2": "pass",
    }
    out = capsys.readouterr().out
    assert "FAILED: b" in out and "boom" in out


def test_budget_skips_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "run_one", lambda *a: {"status": "pass"})
    rc = gc.run_gpu_check(_args(tmp_path, only="a,b", budget_s=5.0))
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    one_gpu = {n: r["status"] for n, r in report["checks"].items() if gc.BY_NAME[n].ranks == 1}
    assert rc == 0 and one_gpu == {"a": "skipped", "b": "skipped"}
    assert report["checks"]["b_ep2"]["status"] == "pass"  # the multi-GPU check has its own limit, not the budget


def test_a_check_past_its_limit_is_killed_and_reported(tmp_path):
    check = dataclasses.replace(gc.BY_NAME["a"], timeout_s=0.5)
    res = gc.run_one(check, _args(tmp_path), tmp_path / "work", 0.5)
    assert res["status"] == "timeout" and res["limit_s"] == 0.5


@pytest.mark.slow
def test_child_processes_run_checks_a_and_f_on_cpu(tmp_path, capsys):
    """The real child path (one process per check) at tiny sizes on the CPU."""
    rc = gc.run_gpu_check(_args(tmp_path, only="a,f"))
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0, report
    assert report["checks"]["a"]["status"] == "pass"
    assert report["checks"]["a"]["fp32"]["pass"] and report["checks"]["a"]["bf16"]["pass"]
    assert report["checks"]["f"]["images_per_s"]["none"] > 0
    assert "check" in capsys.readouterr().out  # the table


def test_experts_check_in_process():
    res = gc.check_experts(gc.Ctx("cpu", "gloo", Path("."), True, None))
    assert res["status"] == "pass", res


def test_wikitext_step_reports_tokens_mfu_with_a_given_peak(tmp_path):
    res = gc.check_wikitext_step("chunked")(gc.Ctx("cpu", "gloo", tmp_path, True, 1.0))
    assert res["status"] == "measured", res
    assert res["tokens_per_s"] > 0 and res["mfu"] is not None and res["mfu"] > 0
    assert res["peak_gib"] is None  # the CPU has no max_memory_allocated


def test_compare_traces():
    a = [{"step": s, "loss": 1.0 / s, "grad_norm": float("nan"), "tokens_per_s": 100.0 + s} for s in range(1, 21)]
    # wall-time keys differ in every run; a NaN (fp16's skipped step) equals a NaN
    b = [{**r, "tokens_per_s": 7.0, "grad_norm": float("nan")} for r in a]
    assert gc.compare_traces(a, b, 10) == {"rows_compared": 10, "exact": True}
    b[14] = {**b[14], "loss": b[14]["loss"] + 1e-9}
    out = gc.compare_traces(a, b, 10)
    assert not out["exact"] and out["first_differences"][0]["step"] == 15
    assert not gc.compare_traces(a, b[:12], 10)["exact"]
    assert not gc.compare_traces(a[:10], b[:10], 10)["exact"]  # nothing after step 10 proves nothing


def test_loss_scale_reads_deepspeeds_attributes():
    class Opt:
        cur_scale = 1024.0

    class Scaler:
        cur_scale = 8.0

    class Engine:
        optimizer = Opt()

    assert gc.loss_scale(Engine()) == 1024.0
    Engine.optimizer = argparse.Namespace(loss_scaler=Scaler())
    assert gc.loss_scale(Engine()) == 8.0


@pytest.mark.slow
@pytest.mark.parametrize("name,world", [("d_bf16", 1), ("d_ep2", 2)])
def test_deepspeed_resume_check_on_cpu(tmp_path, name, world):
    """Check (d)'s logic with gloo on the CPU (bf16, ZeRO 2), in one process and at EP 2 under
    torchrun: the real trainer, checkpoint at 10, a resumed copy reproduces steps 11-20 exactly.
    (fp16 and NCCL need a GPU.)"""
    rc = gc.run_gpu_check(_args(tmp_path, only=name))  # in a child: it starts torch.distributed
    res = json.loads((tmp_path / "gpu_check.json").read_text())["checks"][name]
    assert rc == 0 and res["status"] == "pass", res
    assert res["resume"]["rows_compared"] >= 10 and res["backend"] == "gloo" and res["world_size"] == world


@pytest.mark.slow
def test_fp16_resume_and_overflow_check_on_cpu(tmp_path):
    """Check (d) in fp16: the DeepSpeed version installed here runs fp16 with dynamic loss scaling
    on the CPU too (gloo), so the overflow step's logic is tested here, not only on a GPU."""
    rc = gc.run_gpu_check(_args(tmp_path, only="d_fp16"))
    res = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]["d_fp16"]
    assert rc == 0 and res["status"] == "pass", res
    ov = res["overflow"]
    assert ov["weight_dtype"] == "torch.float16" and all(ov["checks"].values())
    assert ov["scale_after"] == ov["scale_before"] / 2
    assert [s["applied"] for s in ov["overflow_steps"]] == [False] * len(ov["overflow_steps"])
