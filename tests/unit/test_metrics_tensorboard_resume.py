"""After a resume, TensorBoard and metrics.jsonl hold the same steps: the checkpoint's own step (its
training row and validation point, logged before it was saved) survives in both, and what the
interrupted run logged after the checkpoint is gone from both."""

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from msmoe_dist.train.metrics import MetricsLogger


def jsonl_steps(run_dir, key):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if key in r]


def tb_steps(run_dir, tag):
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_resume_keeps_the_checkpoint_step_in_tensorboard(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=True)
    for step in (1, 2):
        log.log(step, {"loss": float(step)})
    log.log(2, {"val.loss": 0.5})  # the validation point of step 2, before its checkpoint
    saved = log.state_dict()  # the checkpoint at step 2
    log.log(3, {"loss": 3.0})  # the interrupted run went on, then died
    log.close()
    resumed = MetricsLogger(tmp_path, tensorboard=True, resume_step=2, resume_state=saved)
    for step in (3, 4):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.log(4, {"val.loss": 0.25})
    resumed.close()
    assert jsonl_steps(tmp_path, "loss") == [1, 2, 3, 4] == tb_steps(tmp_path, "loss")
    assert jsonl_steps(tmp_path, "val.loss") == [2, 4] == tb_steps(tmp_path, "val/loss")
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss")] == [1.0, 2.0, 30.0, 40.0]  # the resumed run's step 3
