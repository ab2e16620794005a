"""msmoe-eval --attack: perplexity on word-attacked valid/test text (see msmoe_dist/data/attack.py).

The attacked copy is made from the split's *text* (the attack is defined on words) and encoded
with the corpus's own tokenizer, so the clean and attacked streams share ids.  Before scoring,
the unmodified text is encoded too and must equal the clean stream being evaluated; otherwise
the text is not the one the ids came from (an edited file, the wrong --text-path) and the two
perplexities would not be comparable.
"""

from __future__ import annotations

import torch

from msmoe_dist.data import DataError, attack_lines
from msmoe_dist.data.attack import read_lines
from msmoe_dist.data.corpus import find_split_files
from msmoe_dist.eval.evaluator import Evaluator
from msmoe_dist.eval.lm import evaluate_tokens
from msmoe_dist.eval.request import EvalRequest


def attacked_scores(ev: Evaluator, corpus, split: str, req: EvalRequest, batch_size: int, seq_len: int) -> dict:
    """``<split>_attacked_{ppl,loss,tokens}`` and the attack's counts for one split."""
    text = find_split_files(req.text_path, (split,))[split] if req.text_path else corpus.text_file(split)
    return attacked_text_scores(ev, corpus.tokenizer, text, corpus.split(split), split, req, batch_size, seq_len)


def attacked_text_scores(
    ev: Evaluator, tokenizer, text, clean: torch.Tensor, name: str, req: EvalRequest, batch_size: int, seq_len: int
) -> dict:
    """The attack on one text file whose clean ids are ``clean``; keys start with ``name``."""
    lines = read_lines(text)
    if not torch.equal(torch.from_numpy(tokenizer.encode_lines(lines)), clean.long()):
        raise DataError(
            f"{text} does not encode to the {name} ids being evaluated (edited, or another corpus); "
            "expected the text the corpus was built from (see --text-path)"
        )
    attacked, stats = attack_lines(lines, seed=req.attack_seed, rate=req.attack_rate)
    stream = torch.from_numpy(tokenizer.encode_lines(attacked))
    res = evaluate_tokens(ev, stream, batch_size, seq_len, req.batches)
    return {
        f"{name}_attacked_ppl": res["ppl"],
        f"{name}_attacked_loss": res["loss"],
        f"{name}_attacked_tokens": res["tokens"],
        f"{name}_attack_candidates": stats.candidates,
        f"{name}_attack_replaced": stats.replaced,
    }


def attack_table(result: dict) -> str:
    """Clean vs attacked perplexity per split, for stderr."""
    rows = [("split", "clean ppl", "attacked ppl", "replaced words")]
    for split in ("valid", "test", "file"):
        if f"{split}_attacked_ppl" in result:
            rows.append(
                (
                    split,
                    f"{result[f'{split}_ppl']:.2f}",
                    f"{result[f'{split}_attacked_ppl']:.2f}",
                    f"{result[f'{split}_attack_replaced']:,} / {result[f'{split}_attack_candidates']:,}",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
    )
