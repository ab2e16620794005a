"""The evaluation attack: 2.5% of the non-stopword words become AAA, deterministically per (seed, line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from msmoe_dist.data import JUNK_TOKEN, UNK, DataError, Vocab, WordTokenizer, attack_lines, load_stopwords
from msmoe_dist.data.attack import attack_line, is_candidate, read_lines

WIKITEXT2 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext-2"
STOP = load_stopwords()


def _check_replacements(before: list[str], after: list[str]) -> int:
    """Asserts that only candidates were replaced, by AAA, word counts unchanged; returns how many."""
    replaced = 0
    for old, new in zip(before, after):
        ow, nw = old.split(), new.split()
        assert len(ow) == len(nw)
        for a, b in zip(ow, nw):
            if a != b:
                assert b == JUNK_TOKEN and is_candidate(a, STOP), (a, b)
                replaced += 1
        if ow == nw:
            assert old == new  # untouched lines are kept byte for byte
    return replaced


def test_stopword_list_ships_with_the_package():
    assert 150 <= len(STOP) <= 200
    assert {"the", "of", "and", "a", "is", "was", "'s", "n't", "don"} <= STOP
    assert all(w == w.lower() and w.strip() == w and not w.startswith("#") for w in STOP)


def test_candidates_are_non_stopword_words():
    assert is_candidate("lobster", STOP) and is_candidate("1998", STOP) and is_candidate("H.", STOP)
    for word in ("the", "The", "THE", ",", ".", "@-@", "@,@", "=", "(", UNK, "'s"):
        assert not is_candidate(word, STOP), word


def test_rate_extremes_and_validation():
    lines = [" The lobster is blue , and the crab is red . \n", " \n", " = Heading = \n"]
    same, stats = attack_lines(lines, seed=3, rate=0.0)
    assert same == lines and stats.replaced == 0 and stats.candidates == 5  # lobster blue crab red Heading
    all_out, stats = attack_lines(lines, seed=3, rate=1.0)
    assert stats.replaced == stats.candidates == 5
    assert all_out[0].split() == "The AAA is AAA , and the AAA is AAA .".split() and all_out[1] == " \n"
    assert all_out[2] == " = AAA = \n"
    with pytest.raises(DataError, match="rate"):
        attack_lines(lines, rate=1.5)
    with pytest.raises(DataError, match="junk"):
        attack_lines(lines, junk="A A")


def _sample_lines(n=400):
    import random

    rng = random.Random(0)
    vocab = ["alpha", "beta", "gamma", "delta", "the", "of", "and", ",", ".", "@-@", "Epsilon", "1990", UNK]
    return [" " + " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 60))) + " \n" for _ in range(n)]


def test_deterministic_per_seed_and_line_index():
    lines = _sample_lines()
    a, sa = attack_lines(lines, seed=11)
    b, _ = attack_lines(lines, seed=11)
    c, sc = attack_lines(lines, seed=12)
    assert a == b and a != c and sa.replaced > 0
    # a line's corruption depends on (seed, its index) only, not on the other lines
    for i in (0, 57, 399):
        assert attack_line(lines[i], i, seed=11)[0] == a[i]
    _check_replacements(lines, a)
    _check_replacements(lines, c)


def test_word_vocabulary_reads_aaa_as_unk_and_keeps_the_length():
    lines = [" the crab sat on the lobster \n"] * 50
    vocab = Vocab.build([line.split() for line in lines])
    tok = WordTokenizer(vocab)
    attacked, stats = attack_lines(lines, seed=0, rate=0.5)
    clean_ids, attacked_ids = tok.encode_lines(lines), tok.encode_lines(attacked)
    assert len(clean_ids) == len(attacked_ids) and stats.replaced > 0
    assert (attacked_ids != clean_ids).sum() == stats.replaced
    assert set(attacked_ids[attacked_ids != clean_ids].tolist()) == {vocab.unk_id}
    with_aaa = WordTokenizer(Vocab.build([["AAA", "crab"]]))
    assert with_aaa.encode_lines([" AAA \n"])[0] == with_aaa.vocab.stoi["AAA"]  # in the vocabulary: its own id


@pytest.mark.parametrize("split", ["valid", "test"])
def test_wikitext2_expected_fraction_of_non_stopwords(split):
    if not (WIKITEXT2 / f"{split}.txt").is_file():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT2} ({split}.txt is needed)")
    lines = read_lines(WIKITEXT2 / f"{split}.txt")
    attacked, stats = attack_lines(lines, seed=0)
    assert stats.lines == len(lines) and stats.candidates > 80_000
    assert _check_replacements(lines, attacked) == stats.replaced
    # Bernoulli(0.025) per candidate: the standard deviation of the fraction is ~0.0004 here
    assert abs(stats.fraction - 0.025) < 0.002, stats
    assert stats.replaced / stats.words < 0.025  # stopwords, punctuation and <unk> are never replaced
