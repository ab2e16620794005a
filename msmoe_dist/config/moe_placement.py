"""Which blocks of a model hold an MoE layer: a function of config values only.

Pure Python, so the config validator counts MoE layers without importing the models; the
models call the same functions to place their MoE blocks.  (Not to be confused with
``parallel/layout.py``, which places ranks, not layers.)
"""

from __future__ import annotations


def lm_moe_blocks(num_layers: int, layout: str) -> list[int]:
    """Language model: all blocks (switch), 0, 2, 4, ... (glam) or the middle one (middle, StableMoE)."""
    if layout == "middle":
        return [num_layers // 2]
    return list(range(num_layers)) if layout == "switch" else list(range(0, num_layers, 2))


def vit_moe_blocks(num_layers: int, moe_layout: str, every: int, last: int) -> list[int]:
    """V-MoE: every k-th block counting from 1 (k=2 of 8 gives 1, 3, 5, 7 as in V-MoE's 'Every-2'),
    or the last n blocks ('Last-n')."""
    if moe_layout == "last":
        return list(range(max(num_layers - last, 0), num_layers))
    return [i for i in range(num_layers) if (i + 1) % every == 0]
