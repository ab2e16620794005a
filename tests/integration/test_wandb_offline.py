"""logging.wandb=true (offline): W&B receives exactly metrics.jsonl's rows, a resume continues the same run,
and a missing wandb package is refused before anything is written."""

import json
import struct
import sys

import pytest
from conftest import tiny_lm_config

from msmoe_dist.train.errors import TrainError
from msmoe_dist.train.trainer import run

wandb = pytest.importorskip("wandb", reason="the wandb package is not installed (pip install -e '.[dev]' has it)")


def wandb_history(run_file) -> list[dict]:
    """The history rows of an offline run file (W&B's LevelDB-style log: 32 KiB blocks, 7-byte record
    headers: crc32c, length, type 1 full / 2 first / 3 middle / 4 last; a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending, rows = run_file.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


def test_wandb_offline_gets_the_metrics_rows_and_a_resume_continues_its_run(tmp_path):
    run(tiny_lm_config(tmp_path, "train.max_steps=2", "logging.tensorboard=false", "logging.wandb=true"))
    run(tiny_lm_config(tmp_path, "train.max_steps=4", "logging.tensorboard=false", "logging.wandb=true",
                       "train.resume=true"))  # fmt: skip
    run_dir = tmp_path / "run"
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # one W&B run, continued
    sent: dict[int, dict] = {}  # W&B merges the rows of one step
    for r in runs:
        for row in wandb_history(next(r.glob("run-*.wandb"))):
            sent.setdefault(row.get("_step"), {}).update(row)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in logged:  # every number of every row (lists such as tokens_per_expert stay in metrics.jsonl)
        numbers = {k: v for k, v in row.items() if k not in ("step", "time") and isinstance(v, (int, float))}
        got = sent.get(row["step"], {})
        assert {k: got.get(k) for k in numbers} == numbers, f"step {row['step']}"
    assert {r["step"] for r in logged} == {1, 2, 3, 4}


def test_wandb_without_the_package_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(TrainError, match="logging.wandb=true needs the wandb package"):
        run(tiny_lm_config(tmp_path, "train.max_steps=2", "logging.wandb=true"))
    assert not (tmp_path / "run").exists()
