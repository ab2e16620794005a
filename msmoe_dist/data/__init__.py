"""msmoe_dist.data: corpora, vocabulary and batches.

A corpus directory (generated synthetic text or WikiText) becomes a vocabulary (word-level
``Vocab`` or sentencepiece, from the train split only) and 1-D token streams
(``load_corpus``); ``prepare_corpus`` (msmoe-prepare) writes the ids once as memory maps
that ``load_corpus`` reads with data.kind=prepared.  ``training_batch`` cuts step-addressed
windows (random or sequential lanes), ``eval_batches`` walks a stream in order;
``attack_lines`` is the evaluation-time word-replacement attack.  User mistakes raise
``DataError`` with a one-line message.
"""

from .attack import JUNK_TOKEN, attack_lines, load_stopwords
from .batches import (
    eval_batches,
    num_eval_batches,
    sequential_batch,
    train_batch,
    training_batch,
    window_seed,
)
from .corpus import Corpus, load_corpus
from .errors import DataError
from .prepared import prepare_corpus
from .splits import SPLITS, find_split_files
from .synthetic import GENERATOR_VERSION, generate_corpus
from .tokenizer import SentencePieceTokenizer, WordTokenizer
from .vocab import EOS, UNK, Vocab, iter_file_tokens, tokenize_line

__all__ = [
    "EOS",
    "GENERATOR_VERSION",
    "JUNK_TOKEN",
    "SPLITS",
    "UNK",
    "Corpus",
    "DataError",
    "SentencePieceTokenizer",
    "Vocab",
    "WordTokenizer",
    "attack_lines",
    "eval_batches",
    "find_split_files",
    "generate_corpus",
    "iter_file_tokens",
    "load_corpus",
    "load_stopwords",
    "num_eval_batches",
    "prepare_corpus",
    "sequential_batch",
    "tokenize_line",
    "train_batch",
    "training_batch",
    "window_seed",
]
