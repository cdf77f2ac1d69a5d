"""eagle3: lossless LLM generation speed-ups with EAGLE-3 speculative decoding.

The library's front door, imported on first use (so that `import eagle3` and the command line stay quick):

    from eagle3 import load_target, shipped_draft, load_drafter, generate, speculative_generate, SamplingParams

Subpackages, by what they hold: runtimes (the target), decoding (the round), methods (the drafters), training,
formats (checkpoint layouts and exports), evaluation (the benchmark harness), serving.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "load_target": "eagle3.runtimes.target",
    "Target": "eagle3.runtimes.target",
    "load_drafter": "eagle3.methods.drafter",
    "shipped_draft": "eagle3.fetch",
    "generate": "eagle3.decoding.generate",
    "speculative_generate": "eagle3.decoding.speculative",
    "SamplingParams": "eagle3.decoding.sampling",
    "TreeSpec": "eagle3.decoding.tree",
    "Engine": "eagle3.decoding.engine",
    "Request": "eagle3.decoding.engine",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'eagle3' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
