"""The synthetic corpus: WikiText layout, determinism, idempotence, refusing to overwrite."""

from __future__ import annotations

import json
import re

import pytest

from msmoe_dist.data import DataError, generate_corpus, synthetic

FILES = ("train.txt", "valid.txt", "test.txt")


def _bytes(d):
    return {name: (d / name).read_bytes() for name in FILES}


def _raises_one_line(match, fn, *args, **kwargs):
    with pytest.raises(DataError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    generate_corpus(tmp_path / "a", 300, seed=7)
    generate_corpus(tmp_path / "b", 300, seed=7)
    generate_corpus(tmp_path / "c", 300, seed=8)
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    assert (tmp_path / "a" / "train.txt").read_bytes() != (tmp_path / "c" / "train.txt").read_bytes()


def test_wikitext_layout_and_line_counts(tmp_path):
    manifest = generate_corpus(tmp_path, 400, seed=1)
    assert manifest["lines"] == {"train": 400, "valid": 20, "test": 20}  # 5% each by default
    lines = (tmp_path / "train.txt").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == 400
    lines = lines[:-1]
    assert all(line.startswith(" ") for line in lines)
    assert any(re.fullmatch(r" = [A-Z][a-z]+( of [A-Z][a-z]+)? = ", line) for line in lines)
    assert any(re.fullmatch(r" = = [A-Z][a-z ]+ = = ", line) for line in lines)
    assert 0.1 < sum(line == " " for line in lines) / len(lines) < 0.6  # blank lines, as in WikiText
    assert generate_corpus(tmp_path / "x", 50, seed=1, num_valid_lines=3, num_test_lines=4)["lines"] == {
        "train": 50,
        "valid": 3,
        "test": 4,
    }


def test_text_has_learnable_structure(tmp_path):
    generate_corpus(tmp_path, 600, seed=3)
    paragraphs = [line.split() for line in (tmp_path / "train.txt").read_text().split("\n") if len(line) > 40]
    tokens = [t for p in paragraphs for t in p]
    assert 150 < len(set(tokens)) < 1000  # a few hundred words
    for words in paragraphs:
        assert words.count("(") == words.count(")") and words.count('"') % 2 == 0  # brackets/quotes closed
        for article, noun in zip(words, words[1:]):
            if article in ("a", "an", "A", "An"):
                assert (article.lower() == "an") == (noun[0] in "aeiou"), (article, noun)
    # Years count up within an article ("In 1861 , ... In 1863 , ...").
    years = [int(p[i + 1]) for p in paragraphs[:50] for i, t in enumerate(p) if t == "In" and p[i + 1].isdigit()]
    assert sum(b >= a for a, b in zip(years, years[1:])) > 0.6 * (len(years) - 1)


def test_second_call_is_a_no_op(tmp_path, monkeypatch):
    first = generate_corpus(tmp_path, 300, seed=5)
    mtimes = {n: (tmp_path / n).stat().st_mtime_ns for n in FILES + ("corpus.json",)}
    # The second call must neither generate text nor write a file (what "fast" meant; no clock involved).
    calls = []
    monkeypatch.setattr(synthetic, "_split_lines", lambda *a: calls.append("_split_lines"))
    monkeypatch.setattr(synthetic, "atomic_write", lambda *a: calls.append("atomic_write"))
    second = generate_corpus(tmp_path, 300, seed=5)
    assert calls == []
    assert first == second
    assert mtimes == {n: (tmp_path / n).stat().st_mtime_ns for n in FILES + ("corpus.json",)}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_other_parameters_are_refused(tmp_path):
    generate_corpus(tmp_path, 300, seed=5)
    before = _bytes(tmp_path)
    msg = _raises_one_line("seed=5", generate_corpus, tmp_path, 300, seed=6)
    assert "seed=6" in msg
    _raises_one_line("300/15/15", generate_corpus, tmp_path, 400, seed=5)
    assert _bytes(tmp_path) == before


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "notes.md").write_text("mine")
    _raises_one_line("notes.md.*refusing to overwrite", generate_corpus, tmp_path, 100, seed=1)
    assert (tmp_path / "notes.md").read_text() == "mine" and not (tmp_path / "train.txt").exists()
    other = tmp_path / "wt"
    other.mkdir()
    (other / "train.txt").write_text(" real text \n")
    _raises_one_line("no corpus.json", generate_corpus, other, 100, seed=1)
    assert (other / "train.txt").read_text() == " real text \n"
    (other / "corpus.json").write_text(json.dumps({"generator": "someone else"}))
    _raises_one_line("not written by", generate_corpus, other, 100, seed=1)
    (other / "corpus.json").write_text("{not json")
    _raises_one_line("unreadable", generate_corpus, other, 100, seed=1)


def test_interrupted_run_is_regenerated_but_edits_are_refused(tmp_path):
    generate_corpus(tmp_path, 200, seed=2)
    good = _bytes(tmp_path)
    manifest = json.loads((tmp_path / "corpus.json").read_text())
    # Simulate a crash after the incomplete manifest and one split were written.
    (tmp_path / "corpus.json").write_text(json.dumps({**manifest, "complete": False}))
    (tmp_path / "valid.txt").unlink()
    generate_corpus(tmp_path, 200, seed=2)
    assert _bytes(tmp_path) == good
    with open(tmp_path / "train.txt", "a") as f:
        f.write(" edited \n")
    _raises_one_line("no longer match", generate_corpus, tmp_path, 200, seed=2)


def test_bad_arguments(tmp_path):
    _raises_one_line("num_train_lines", generate_corpus, tmp_path / "a", 0, seed=1)
    _raises_one_line("seed", generate_corpus, tmp_path / "a", 10, seed="1")
    _raises_one_line("num_valid_lines", generate_corpus, tmp_path / "a", 10, seed=1, num_valid_lines=0)
    (tmp_path / "file").write_text("x")
    _raises_one_line("is a file", generate_corpus, tmp_path / "file", 10, seed=1)


def test_default_size_line_and_word_counts(tmp_path):
    manifest = generate_corpus(tmp_path, 20000, seed=1234)
    assert manifest["lines"] == {"train": 20000, "valid": 1000, "test": 1000}
    assert 300_000 < len((tmp_path / "train.txt").read_text().split()) < 1_000_000
