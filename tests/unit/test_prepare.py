"""msmoe-prepare: token-id memmaps that round-trip to the text, load without copying, and refuse bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from msmoe_dist.config.schema import DataConfig
from msmoe_dist.data import (
    EOS,
    UNK,
    DataError,
    Vocab,
    eval_batches,
    iter_file_tokens,
    load_corpus,
    prepare_corpus,
    training_batch,
)
from msmoe_dist.data.tokenizer import WordTokenizer, count_words

REPO = Path(__file__).resolve().parents[2]
WIKITEXT2 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext-2"


def _need_wikitext2():
    if not (WIKITEXT2 / "valid.txt").is_file() or not (WIKITEXT2 / "test.txt").is_file():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT2} (valid.txt and test.txt are needed)")


def _wikitext2_dir(tmp_path: Path) -> Path:
    """train.txt is WikiText-2's valid.txt (its train split is not shipped), valid/test as published."""
    d = tmp_path / "wt2"
    d.mkdir()
    for name, target in (("train.txt", "valid.txt"), ("valid.txt", "valid.txt"), ("test.txt", "test.txt")):
        (d / name).symlink_to(WIKITEXT2 / target)
    return d


def _write(d: Path, texts: dict[str, str | bytes]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        data = text.encode("utf-8") if isinstance(text, str) else text
        (d / f"{split}.txt").write_bytes(data)
    return d


def _reference_ids(vocab: Vocab, path: Path) -> list[int]:
    """The slow, obviously correct encoding: iter_file_tokens + Vocab.encode."""
    return [i for line in iter_file_tokens(path) for i in vocab.encode(line)]


def test_wikitext2_round_trip_counts_and_memmap(tmp_path):
    _need_wikitext2()
    src = _wikitext2_dir(tmp_path)
    meta = prepare_corpus(src, tmp_path / "prep", progress=False)
    assert {s: e["tokens"] for s, e in meta["splits"].items()} == {"train": 217_646, "valid": 217_646, "test": 245_569}
    assert meta["dtype"] == "uint16" and meta["magic"] == "msmoe_prepared" and meta["version"] == 1
    assert meta["splits"]["valid"]["lines"] == 3760 and meta["splits"]["test"]["lines"] == 4358
    corpus = load_corpus(DataConfig(kind="prepared", path=str(tmp_path / "prep")))
    assert corpus.train.dtype == torch.uint16  # the memmap itself, not an int64 copy
    assert corpus.vocab == Vocab.from_file(src / "train.txt")
    for split in ("valid", "test"):
        tokens = [t for line in iter_file_tokens(src / f"{split}.txt") for t in line]
        decoded = corpus.vocab.decode(corpus.split(split))
        # valid is the train text, so it decodes exactly; test's unseen words come back as <unk>
        if split == "valid":
            assert decoded == tokens
        else:
            assert len(decoded) == len(tokens)
            assert all(d == t or (d == UNK and t not in corpus.vocab) for d, t in zip(decoded, tokens))
    text = load_corpus(DataConfig(kind="text", path=str(src)))
    for split in ("train", "valid", "test"):
        assert torch.equal(corpus.split(split).long(), text.split(split))
    # batches from the memmap are int64 and equal those from the int64 stream
    cfg = DataConfig(kind="prepared", path=str(tmp_path / "prep"), batch_size=4, seq_len=32, sampler="sequential")
    for sampler in ("random", "sequential"):
        cfg.sampler = sampler
        x, y = training_batch(cfg, corpus.train, 7, 0, 1, 2)
        x2, y2 = training_batch(cfg, text.train, 7, 0, 1, 2)
        assert x.dtype == torch.int64 and torch.equal(x, x2) and torch.equal(y, y2)
    first = next(eval_batches(corpus.test, 4, 32))
    assert first[0].dtype == torch.int64 and torch.equal(first[0], next(eval_batches(text.test, 4, 32))[0])


def test_block_encoder_equals_the_reference_tokenisation(tmp_path):
    # \r\n and lone \r line breaks, a last line without a newline, Unicode spaces that str.split() splits on,
    # a literal <eos>, unseen words in valid, and blocks smaller than the file (several chunks).
    train = " The cat\u00a0sat . \r\n\n = Heading = \r <unk> cat <eos> dog\u2003dog \u00e9t\u00e9 \x1c x\n last line"
    valid = " the cat zebra .\n\n unseen \u00e9t\u00e9 words\r\n"
    src = _write(tmp_path / "src", {"train": train, "valid": valid, "test": "cat\n"})
    vocab = Vocab.from_file(src / "train.txt")
    tok = WordTokenizer.train(src / "train.txt")
    assert tok.vocab == vocab
    assert count_words(src / "train.txt") == Counter(t for line in iter_file_tokens(src / "train.txt") for t in line)
    for split in ("train", "valid"):
        assert tok.encode_file(src / f"{split}.txt").tolist() == _reference_ids(vocab, src / f"{split}.txt")
    prepare_corpus(src, tmp_path / "prep", progress=False)
    corpus = load_corpus(DataConfig(kind="prepared", path=str(tmp_path / "prep")))
    for split in ("train", "valid"):
        assert corpus.split(split).tolist() == _reference_ids(vocab, src / f"{split}.txt")
    assert corpus.valid.tolist().count(vocab.unk_id) == 4  # the (train has The), zebra, unseen, words


def test_large_vocabulary_uses_uint32_and_subset_of_splits(tmp_path):
    words = " ".join(f"w{i}" for i in range(70_000))
    src = _write(
        tmp_path / "src", {"train": f" {words} \n {words} \n", "valid": " w1 w69999 nope \n", "test": " w5 \n"}
    )
    meta = prepare_corpus(src, tmp_path / "prep", splits=("valid",), progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002 and set(meta["splits"]) == {"valid"}
    assert not (tmp_path / "prep" / "train.bin").exists()
    corpus = load_corpus(DataConfig(kind="prepared", path=str(tmp_path / "prep")), splits=("valid",))
    assert corpus.valid.dtype == torch.uint32
    assert corpus.vocab.decode(corpus.valid) == ["w1", "w69999", UNK, EOS]
    with pytest.raises(DataError, match="no train split"):
        load_corpus(DataConfig(kind="prepared", path=str(tmp_path / "prep")), splits=("train",))


def _prepared(tmp_path: Path) -> Path:
    src = _write(tmp_path / "src", {"train": " a b c a \n b a \n", "valid": " a c \n", "test": " b \n"})
    prepare_corpus(src, tmp_path / "prep", progress=False)
    return tmp_path / "prep"


def test_truncated_bin_is_refused(tmp_path):
    prep = _prepared(tmp_path)
    data = (prep / "valid.bin").read_bytes()
    (prep / "valid.bin").write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"valid\.bin has 4 bytes, but its header promises 3 uint16 tokens"):
        load_corpus(DataConfig(kind="prepared", path=str(prep)))
    (prep / "valid.bin").unlink()
    with pytest.raises(DataError, match=r"lacks valid\.bin"):
        load_corpus(DataConfig(kind="prepared", path=str(prep)))


def test_vocabulary_whose_hash_differs_from_the_header_is_refused(tmp_path):
    prep = _prepared(tmp_path)
    Vocab(["b", "a", "c", EOS, UNK]).save(prep / "vocab.json")  # valid file, other id order
    with pytest.raises(DataError, match="sha256 .* but its meta.json header says"):
        load_corpus(DataConfig(kind="prepared", path=str(prep)))
    (prep / "vocab.json").unlink()
    with pytest.raises(DataError, match="vocabulary file .* not found"):
        load_corpus(DataConfig(kind="prepared", path=str(prep)))


def test_header_problems_are_one_line_data_errors(tmp_path):
    prep = _prepared(tmp_path)
    meta = json.loads((prep / "meta.json").read_text())
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(DataConfig(kind="prepared", path=str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match="has no meta.json"):
        load_corpus(DataConfig(kind="prepared", path=str(tmp_path / "src")))
    for patch, pattern in (
        ({"magic": "other"}, "magic"),
        ({"version": 99}, "format version 99"),
        ({"dtype": "float32"}, "dtype"),
    ):
        (prep / "meta.json").write_text(json.dumps({**meta, **patch}))
        with pytest.raises(DataError, match=pattern):
            load_corpus(DataConfig(kind="prepared", path=str(prep)))
    (prep / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        load_corpus(DataConfig(kind="prepared", path=str(prep)))
    (prep / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="tokenized with .*word.* but the config asks for .*sentencepiece"):
        load_corpus(DataConfig(kind="prepared", path=str(prep), tokenizer="sentencepiece"))


def test_refuses_to_overwrite_without_the_flag(tmp_path):
    prep = _prepared(tmp_path)
    with pytest.raises(DataError, match="already holds a prepared corpus"):
        prepare_corpus(tmp_path / "src", prep, progress=False)
    (tmp_path / "src" / "train.txt").write_text(" z z \n")
    meta = prepare_corpus(tmp_path / "src", prep, overwrite=True, progress=False)
    assert meta["vocab_size"] == 3  # z, <eos>, <unk>
    with pytest.raises(DataError, match="has no train/valid/test split"):
        prepare_corpus(tmp_path / "prep", tmp_path / "other", progress=False)
    with pytest.raises(DataError, match="subset of train,valid,test"):
        prepare_corpus(tmp_path / "src", tmp_path / "other", splits=("dev",), progress=False)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_prepared_equals_text_and_round_trips(tmp_path, model_type):
    from msmoe_dist.data import generate_corpus

    generate_corpus(tmp_path / "syn", 300, seed=3)
    (tmp_path / "syn" / "test.txt").write_text(" the <unk> of Ashford .\n")
    cfg = dict(tokenizer="sentencepiece", sp_vocab_size=300, sp_model_type=model_type)
    meta = prepare_corpus(
        tmp_path / "syn",
        tmp_path / "prep",
        tokenizer="sentencepiece",
        sp_vocab_size=300,
        sp_model_type=model_type,
        progress=False,
    )
    assert meta["tokenizer"] == {"kind": "sentencepiece", "sp_vocab_size": 300, "sp_model_type": model_type}
    prepared = load_corpus(DataConfig(kind="prepared", path=str(tmp_path / "prep"), **cfg))
    text = load_corpus(DataConfig(kind="text", path=str(tmp_path / "syn"), **cfg))
    assert prepared.vocab.sha256() == text.vocab.sha256() == meta["vocab_sha256"]
    for split in ("train", "valid", "test"):
        assert torch.equal(prepared.split(split).long(), text.split(split))
    pieces = prepared.vocab.decode(prepared.test)
    assert pieces[-1] == EOS and UNK in pieces  # the literal <unk> is one <unk> id, not '<', 'unk', '>'
    # the first lines of train decode back to their words (pieces joined, \u2581 marks a word start)
    train_lines = (tmp_path / "syn" / "train.txt").read_text().split("\n")[:12]
    num_ids = len(prepared.tokenizer.encode_lines(train_lines))
    decoded = "".join(prepared.vocab.decode(prepared.train[:num_ids]))
    assert decoded.count(EOS) == 12
    assert decoded.replace(EOS, " ").replace("\u2581", " ").split() == " ".join(train_lines).split()
    with pytest.raises(DataError, match="tokenized with"):
        load_corpus(
            DataConfig(
                kind="prepared",
                path=str(tmp_path / "prep"),
                tokenizer="sentencepiece",
                sp_vocab_size=301,
                sp_model_type=model_type,
            )
        )


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "msmoe_dist.cli", "prepare", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_help_and_one_line_errors(tmp_path):
    res = _cli("--help")
    assert res.returncode == 0
    for flag in ("--splits", "--tokenizer", "--sp-vocab-size", "--sp-model-type", "--overwrite", "--no-progress"):
        assert flag in res.stdout
    res = _cli(str(tmp_path / "missing"), str(tmp_path / "out"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("msmoe-prepare: error: data directory")
    src = _write(tmp_path / "src", {"train": " a b \n", "valid": " a \n", "test": " b \n"})
    res = _cli(str(src), str(tmp_path / "out"), "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "data.kind=prepared" in res.stdout
    # ids by count, then token: <eos> 0, a 1, b 2, <unk> 3; test is " b " + <eos>
    assert np.fromfile(tmp_path / "out" / "test.bin", dtype="<u2").tolist() == [2, 0]
