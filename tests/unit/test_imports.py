"""Every module of the package imports on its own, in a fresh interpreter.

An import circle (a imports b imports a) only fails for the module that is imported first, so a test
process, which has already imported most of the package, hides it. Here each module gets its own
`python -c "import <module>"`, two at a time (the machine has two cores). The optional extras
(torchvision, deepspeed) are installed with the dev environment, so every module must import.

Packages go before their modules. A fresh `import p.m` runs a fresh `import p` first and then stops if
`p.m` is already loaded, so when the fresh `import p` loaded `p.m` (p/__init__.py imports it), the
import of `p.m` on its own has necessarily the same outcome, and its interpreter is saved.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "msmoe_dist"


def _modules(path: Path, prefix: str) -> list[str]:
    """Module names under ``path``, found on disk (pkgutil.walk_packages would import the packages)."""
    names = []
    for info in pkgutil.iter_modules([str(path)]):
        name = prefix + info.name
        names.append(name)
        if info.ispkg:
            names += _modules(path / info.name, name + ".")
    return names


MODULES = ["msmoe_dist", *_modules(PACKAGE, "msmoe_dist.")]

_REPORT = "import sys; print(' '.join(n for n in sys.modules if n == 'msmoe_dist' or n.startswith('msmoe_dist.')))"


@dataclass(frozen=True)
class Outcome:
    ok: bool
    stderr: str
    loaded: frozenset[str]  # the package's modules in sys.modules after the import


def _import_alone(module: str) -> Outcome:
    res = subprocess.run(
        [sys.executable, "-c", f"import {module}\n{_REPORT}"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    return Outcome(res.returncode == 0, res.stderr, frozenset(res.stdout.split()))


class _Outcomes(dict):
    def __repr__(self) -> str:  # pytest prints fixture values in a failure; keep that line short
        return f"<fresh-interpreter imports of {len(self)} modules>"


@pytest.fixture(scope="module")
def outcomes() -> _Outcomes:
    done = _Outcomes()
    with ThreadPoolExecutor(max_workers=2) as pool:
        for depth in sorted({m.count(".") for m in MODULES}):
            level = [m for m in MODULES if m.count(".") == depth]
            run = []
            for m in level:
                parent = done.get(m.rpartition(".")[0])
                if parent is not None and parent.ok and m in parent.loaded:
                    done[m] = parent
                else:
                    run.append(m)
            done.update(zip(run, pool.map(_import_alone, run), strict=True))
    return done


def test_the_walk_finds_the_package():
    assert {"msmoe_dist.cli", "msmoe_dist.moe", "msmoe_dist.moe.layer", "msmoe_dist.momentum.update"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module, outcomes):
    ok, stderr = outcomes[module].ok, outcomes[module].stderr
    assert ok, f"python -c 'import {module}' fails in a fresh interpreter:\n{stderr[-3000:]}"
