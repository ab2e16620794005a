"""msmoe_dist: sparse mixture-of-experts transformers with momentum, trained at scale.

The public API is what a researcher needs to put a momentum MoE stack into their own ``nn.Module``
(README.md, "Use the momentum MoE layer in your own model", shows it in use):

- ``MoEConfig``, ``MomentumConfig``: the two sub-configs (dataclasses; every field documents itself).
- ``MoELayer``: route, dispatch, run the experts, combine; ``layer(x).out`` has x's shape. Returns a
  ``MoEOutput`` (``out``, ``aux_loss``, ``stats``).
- ``Router``: the top-k router the layer builds for ``MoEConfig.router="topk"``.
- ``Dispatcher``, ``LocalDispatcher``: the interface that moves token rows to the experts and back, and
  its single-process implementation, the layer's default; expert parallelism swaps in another one
  (``MoELayer(d, cfg, dispatcher=...)``).
- ``MomentumUpdate``, ``MomentumState``: the residual update rule across the stack (hyper-parameters
  only) and the token-local state it threads from layer to layer (fresh for every forward pass).

The names are resolved on first use (PEP 562), so ``import msmoe_dist.<anything>`` does not load
PyTorch, the MoE code and the config tree just because this package's ``__init__`` ran first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it (through that package's own public names)
_EXPORTS = {
    "MoEConfig": "msmoe_dist.config",
    "MomentumConfig": "msmoe_dist.config",
    "MoELayer": "msmoe_dist.moe",
    "MoEOutput": "msmoe_dist.moe",
    "Router": "msmoe_dist.moe",
    "Dispatcher": "msmoe_dist.moe",
    "LocalDispatcher": "msmoe_dist.moe",
    "MomentumUpdate": "msmoe_dist.momentum",
    "MomentumState": "msmoe_dist.momentum",
}

__all__ = [
    "Dispatcher",
    "LocalDispatcher",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "MomentumConfig",
    "MomentumState",
    "MomentumUpdate",
    "Router",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ below imports on demand
    from msmoe_dist.config import MoEConfig, MomentumConfig
    from msmoe_dist.moe import Dispatcher, LocalDispatcher, MoELayer, MoEOutput, Router
    from msmoe_dist.momentum import MomentumState, MomentumUpdate


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
