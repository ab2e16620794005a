"""The metrics log restores its own position on resume: rows the interrupted run logged after the
checkpoint are dropped, by the byte position the checkpoint recorded (or, for a checkpoint from before
positions were recorded, by step)."""

import json

from msmoe_dist.train.metrics import MetricsLogger


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_cuts_the_log_back_to_the_recorded_position(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2):
        log.log(step, {"loss": float(step)})
    saved = log.state_dict()  # what a checkpoint at step 2 records
    log.log(2, {"val.loss": 0.5})  # logged after the save: not part of the checkpoint
    log.log(3, {"loss": 3.0})
    log.close()
    resumed = MetricsLogger(tmp_path, tensorboard=False, resume_step=2, resume_state=saved)
    resumed.log(3, {"loss": 30.0})
    resumed.close()
    assert rows(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0}]


def test_a_checkpoint_without_a_position_cuts_by_step(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        log.log(step, {"loss": float(step)})
    log.close()
    MetricsLogger(tmp_path, tensorboard=False, resume_step=2).close()
    assert [r["step"] for r in rows(tmp_path)] == [1, 2]


def test_a_fresh_run_starts_a_new_log(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 9}\n')
    MetricsLogger(tmp_path, tensorboard=False).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""
