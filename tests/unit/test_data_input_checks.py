"""Data inputs are checked before anything is written, and at load time rather than at the first batch
(issue 'Nothing lost, nothing silent', item 7)."""

from pathlib import Path

import pytest

from msmoe_dist.config import load_config
from msmoe_dist.data import DataError, prepare_corpus
from msmoe_dist.train.tasks import make_task

TEXT = "the cat sat on the mat\nthe dog sat on the log\n" * 20


def _corpus(root: Path, train: str = TEXT, valid: str = TEXT, test: str = TEXT) -> Path:
    root.mkdir(parents=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (root / f"{name}.txt").write_text(text)
    return root


def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("tokenizer", ["word", "sentencepiece"])
def test_overwrite_from_an_empty_train_split_leaves_the_old_output_intact(tmp_path, tokenizer):
    out = tmp_path / "prepared"
    prepare_corpus(_corpus(tmp_path / "good"), out, progress=False)
    before = _snapshot(out)
    with pytest.raises(DataError, match=r"train split .* is empty.*was not changed"):
        prepare_corpus(
            _corpus(tmp_path / "bad", train="\n  \n"), out, tokenizer=tokenizer, overwrite=True, progress=False
        )
    assert _snapshot(out) == before


def test_an_empty_valid_split_is_refused_before_writing(tmp_path):
    out = tmp_path / "prepared"
    with pytest.raises(DataError, match=r"valid split .* is empty"):
        prepare_corpus(_corpus(tmp_path / "src", valid=""), out, progress=False)
    assert not out.exists()


def _lm_task(tmp_path: Path, seq_len: int):
    cfg = load_config(
        None,
        [
            "data.kind=text",
            f"data.path={tmp_path / 'src'}",
            f"data.seq_len={seq_len}",
            f"model.max_seq_len={max(seq_len, 16)}",
        ],
    )
    return make_task(cfg)


def test_a_train_split_shorter_than_one_window_is_refused_at_load(tmp_path):
    _corpus(tmp_path / "src", train="a b c d\n")
    with pytest.raises(DataError, match=r"train split has \d+ tokens, fewer than one window of data.seq_len=16"):
        _lm_task(tmp_path, 16).load_data()


def test_an_empty_valid_text_is_refused_at_load(tmp_path):
    _corpus(tmp_path / "src", valid="")
    with pytest.raises(DataError, match=r"valid split has 0 tokens"):
        _lm_task(tmp_path, 8).load_data()


def test_a_training_batch_of_only_unreadable_images_is_one_line_not_a_nan_loss(tmp_path):
    from msmoe_dist.data.images import ImageDataError

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "img" / split / cls).mkdir(parents=True)
            for i in range(2):
                (tmp_path / "img" / split / cls / f"{i}.JPEG").write_text("not an image")
    cfg = load_config(
        None,
        [
            "model.kind=vit",
            "data.kind=imagenet",
            f"data.path={tmp_path / 'img'}",
            "data.batch_size=2",
            "vision.num_classes=2",
            "vision.image_size=32",
            "vision.patch_size=8",
            "vision.num_workers=0",
        ],
    )
    task = make_task(cfg)
    task.load_data()
    task.start(0, 0, 1)
    with pytest.raises(
        ImageDataError, match=r"every image of a training batch was unreadable \(2 files, e\.g\. .*JPEG"
    ):
        task.micro_batches(0)
    task.close()
