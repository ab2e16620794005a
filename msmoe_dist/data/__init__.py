"""msmoe_dist.data: corpora, vocabulary and batches.

A corpus directory (generated synthetic text or WikiText) becomes a word-level ``Vocab``
and 1-D int64 token streams (``load_corpus``); ``train_batch`` cuts step-addressed random
windows from a stream, ``eval_batches`` walks it in order.  User mistakes raise
``DataError`` with a one-line message.
"""

from .batches import eval_batches, num_eval_batches, train_batch, window_seed
from .corpus import SPLITS, Corpus, find_split_files, load_corpus
from .errors import DataError
from .synthetic import GENERATOR_VERSION, generate_corpus
from .vocab import EOS, UNK, Vocab, iter_file_tokens, tokenize_line

__all__ = [
    "EOS",
    "GENERATOR_VERSION",
    "SPLITS",
    "UNK",
    "Corpus",
    "DataError",
    "Vocab",
    "eval_batches",
    "find_split_files",
    "generate_corpus",
    "iter_file_tokens",
    "load_corpus",
    "num_eval_batches",
    "tokenize_line",
    "train_batch",
    "window_seed",
]
