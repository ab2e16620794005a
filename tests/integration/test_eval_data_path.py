"""msmoe-eval --data-path: a copy of a generated corpus, a single text file, and a path that is not there."""

import shutil

import pytest
from conftest import tiny_lm_config

from msmoe_dist.checkpoint import CheckpointError
from msmoe_dist.eval.checkpoint_eval import evaluate_checkpoint
from msmoe_dist.eval.request import EvalRequest
from msmoe_dist.train.trainer import run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_data_path")
    cfg = tiny_lm_config(tmp, "train.max_steps=2", "logging.tensorboard=false")
    run(cfg)
    return tmp


def test_a_copy_of_the_generated_corpus_scores_like_the_original(trained):
    copy = trained / "copy"
    copy.mkdir()
    for name in ("train.txt", "valid.txt", "test.txt"):  # the text only: no corpus.json, no cache
        shutil.copy(trained / "data" / name, copy / name)
    original = evaluate_checkpoint(EvalRequest(checkpoint=str(trained / "run")))
    copied = evaluate_checkpoint(EvalRequest(checkpoint=str(trained / "run"), data_path=str(copy)))
    assert copied["valid_ppl"] == original["valid_ppl"] and copied["test_ppl"] == original["test_ppl"]
    assert not (copy / "corpus.json").exists()  # read, never generated into


def test_a_single_text_file_is_scored_with_the_training_vocabulary(trained):
    test_txt = trained / "data" / "test.txt"
    whole = evaluate_checkpoint(EvalRequest(checkpoint=str(trained / "run"), splits=("test",)))
    one = evaluate_checkpoint(EvalRequest(checkpoint=str(trained / "run"), data_path=str(test_txt), attack=True))
    assert one["file"] == str(test_txt) and one["ppl"] == one["file_ppl"]
    assert one["file_ppl"] == whole["test_ppl"] and one["file_tokens"] == whole["test_tokens"]
    assert one["file_attack_replaced"] > 0 and one["file_attacked_ppl"] != one["file_ppl"]


def test_a_missing_data_path_is_one_clear_error(trained):
    with pytest.raises(CheckpointError, match="does not exist, expected a corpus directory or a text file"):
        evaluate_checkpoint(EvalRequest(checkpoint=str(trained / "run"), data_path=str(trained / "nowhere")))
