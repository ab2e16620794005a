"""Vocabulary, split-file discovery and corpus loading (with its cache)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from msmoe_dist.config.schema import DataConfig
from msmoe_dist.data import EOS, UNK, DataError, Vocab, find_split_files, iter_file_tokens, load_corpus, tokenize_line
from msmoe_dist.data import corpus as corpus_mod
from msmoe_dist.data.tokenizer import WordTokenizer

WIKITEXT2 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext-2"


def _write_splits(d: Path, texts: dict, layout="txt"):
    d.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        (d / (f"{split}.txt" if layout == "txt" else f"wiki.{split}.tokens")).write_text(text, encoding="utf-8")
    return d


def test_tokenisation_appends_eos_to_every_line_blank_ones_too():
    assert tokenize_line(" The cat sat . \n") == ["The", "cat", "sat", ".", EOS]
    assert tokenize_line(" \n") == [EOS]
    assert tokenize_line("") == [EOS]


def test_wikitext2_token_counts_match_the_reference():
    if not (WIKITEXT2 / "valid.txt").is_file() or not (WIKITEXT2 / "test.txt").is_file():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT2} (valid.txt and test.txt are needed)")
    assert sum(len(line) for line in iter_file_tokens(WIKITEXT2 / "valid.txt")) == 217_646
    assert sum(len(line) for line in iter_file_tokens(WIKITEXT2 / "test.txt")) == 245_569


def test_wikitext2_through_load_corpus(tmp_path):
    if not (WIKITEXT2 / "valid.txt").is_file() or not (WIKITEXT2 / "test.txt").is_file():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT2} (valid.txt and test.txt are needed)")
    # No train split is shipped here, so valid stands in for it (links keep the shared copy read-only).
    for name, source in (("train.txt", "valid.txt"), ("wiki.valid.tokens", "valid.txt"), ("test.txt", "test.txt")):
        os.symlink(WIKITEXT2 / source, tmp_path / name)
    corpus = load_corpus(DataConfig(kind="text", path=str(tmp_path)))
    assert corpus.valid.numel() == 217_646 and corpus.test.numel() == 245_569
    assert torch.equal(corpus.train, corpus.valid)
    assert corpus.vocab.itos[corpus.valid[0]] == EOS and UNK in corpus.vocab


def test_vocab_order_unk_and_oov():
    vocab = Vocab.build([["b", "a", "b", "c"], ["a", "b"]])
    assert vocab.itos == ["b", "a", "c", UNK]  # by count desc, then token; <unk> appended
    assert len(vocab) == 4 and "a" in vocab and "z" not in vocab
    assert vocab.encode(["c", "zebra", "b"]) == [2, vocab.unk_id, 0]
    assert vocab.decode(torch.tensor([2, 3, 0])) == ["c", UNK, "b"]
    with_unk = Vocab.build([[UNK, UNK, "x"]])
    assert with_unk.itos == [UNK, "x"] and with_unk.unk_id == 0  # present once, ranked by its count
    with pytest.raises(DataError, match="out of range"):
        vocab.decode([4])


def test_vocab_save_load_round_trip(tmp_path):
    vocab = Vocab.build([tokenize_line(' Zürich = Genève @-@ " quoted " ')])
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocab.load(tmp_path / "vocab.json")
    assert loaded == vocab and loaded.sha256() == vocab.sha256() and len(loaded) == len(vocab)
    words = ["Genève", "unseen", EOS]
    assert loaded.decode(loaded.encode(words)) == ["Genève", UNK, EOS]
    assert Vocab.build([["b", "a"]]).sha256() != Vocab.build([["a", "b", "b"]]).sha256()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(DataError, match="unreadable"):
        Vocab.load(tmp_path / "bad.json")
    with pytest.raises(DataError, match="not found"):
        Vocab.load(tmp_path / "missing.json")
    text = (tmp_path / "vocab.json").read_text(encoding="utf-8").replace("Genève", "Geneva")
    (tmp_path / "vocab.json").write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match="sha256"):
        Vocab.load(tmp_path / "vocab.json")


def test_both_file_layouts_are_found(tmp_path):
    texts = {"train": " a b \n", "valid": " a \n", "test": " b \n"}
    txt = find_split_files(_write_splits(tmp_path / "txt", texts))
    assert {s: p.name for s, p in txt.items()} == {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}
    tok = find_split_files(_write_splits(tmp_path / "tok", texts, layout="tokens"))
    assert tok["valid"].name == "wiki.valid.tokens" and tok["train"].name == "wiki.train.tokens"


def test_missing_directory_and_split_messages(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        find_split_files(tmp_path / "nope")
    assert "wiki.train.tokens" in str(info.value) and "\n" not in str(info.value)
    _write_splits(tmp_path / "part", {"train": " a \n", "test": " a \n"})
    with pytest.raises(DataError, match=r"no valid split: looked for valid\.txt, wiki\.valid\.tokens"):
        find_split_files(tmp_path / "part")
    assert set(find_split_files(tmp_path / "part", ("train", "test"))) == {"train", "test"}
    with pytest.raises(DataError, match="valid"):
        load_corpus(DataConfig(kind="text", path=str(tmp_path / "part")))


def test_load_synthetic_corpus_and_cache(tmp_path, monkeypatch):
    cfg = DataConfig(kind="synthetic", path=str(tmp_path / "syn"), synthetic_lines=200, synthetic_seed=9)
    corpus = load_corpus(cfg)
    for stream in (corpus.train, corpus.valid, corpus.test):
        assert stream.dtype == torch.int64 and stream.dim() == 1 and stream.numel() > 100
        assert int(stream.max()) < len(corpus.vocab)
    first_line = (tmp_path / "syn" / "train.txt").read_text().split("\n")[0]
    assert corpus.vocab.decode(corpus.train[: len(tokenize_line(first_line))]) == tokenize_line(first_line)
    cache = tmp_path / "syn" / ".msmoe_cache"
    assert {p.name for p in cache.iterdir()} == {"vocab.pt", "train.pt", "valid.pt", "test.pt"}

    def no_encoding(*args, **kwargs):
        raise AssertionError("the second load should come from the cache")

    monkeypatch.setattr(WordTokenizer, "encode_file", no_encoding)
    monkeypatch.setattr(corpus_mod, "count_words", no_encoding)
    again = load_corpus(cfg, splits=("valid",))
    assert again.train is None and again.test is None and torch.equal(again.valid, corpus.valid)
    assert again.vocab == corpus.vocab
    with pytest.raises(DataError, match="not loaded"):
        again.split("test")


def test_stale_cache_is_rebuilt(tmp_path):
    d = _write_splits(tmp_path, {"train": " a b a \n", "valid": " a a \n", "test": " b \n"})
    cfg = DataConfig(kind="text", path=str(d))
    assert load_corpus(cfg).valid.tolist() == [0, 0, 1]  # ids: a (count 2), then <eos> < b (count 1 each)
    (d / "valid.txt").write_text(" b b b zzz \n")
    assert load_corpus(cfg).valid.tolist() == [2, 2, 2, 3, 1]  # zzz is out of vocabulary -> <unk>
    (d / "train.txt").write_text(" b b b b \n")  # another size: an mtime tick can be coarser than the test
    corpus = load_corpus(cfg)
    assert corpus.vocab.itos[:2] == ["b", EOS] and corpus.valid.tolist() == [0, 0, 0, corpus.vocab.unk_id, 1]
    (d / ".msmoe_cache" / "valid.pt").write_bytes(b"garbage")
    assert torch.equal(load_corpus(cfg).valid, corpus.valid)


def test_cache_write_failure_is_not_fatal(tmp_path, monkeypatch):
    d = _write_splits(tmp_path, {"train": " a b \n", "valid": " a \n", "test": " b \n"})

    def read_only(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(corpus_mod.torch, "save", read_only)
    corpus = load_corpus(DataConfig(kind="text", path=str(d)))
    assert corpus.test.tolist() == [corpus.vocab.stoi["b"], corpus.vocab.eos_id]


def test_empty_train_and_bad_kind(tmp_path):
    d = _write_splits(tmp_path, {"train": "", "valid": " a \n", "test": " a \n"})
    with pytest.raises(DataError, match="train split .* is empty"):
        load_corpus(DataConfig(kind="text", path=str(d)))
    with pytest.raises(DataError, match="data.kind"):
        load_corpus(DataConfig(kind="web", path=str(d)))
    with pytest.raises(DataError, match="unknown split"):
        load_corpus(DataConfig(kind="text", path=str(d)), splits=("dev",))
