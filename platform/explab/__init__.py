"""explab: a distributed experiment platform on Ray for explainable-ML research.

The names a job uses are importable from here (``from explab import Job, JobConfig, RunContext``);
they load lazily, on first access, so ``import explab`` stays light (no torch, no Ray). Each also
lives in the module named beside it below, which is where its documentation is.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # jobs and their configs
    "Job": "explab.job", "JobConfig": "explab.config", "Section": "explab.config",
    "load_config": "explab.config", "RunContext": "explab.runs", "execute": "explab.runs",
    # errors
    "ExplabError": "explab.errors", "ConfigError": "explab.errors", "ModelError": "explab.errors",
    # models, encoders and servers
    "ModelSpec": "explab.models", "load_model": "explab.models", "EncoderSpec": "explab.models",
    "load_encoder": "explab.models", "resolve_device": "explab.models", "ServerOptions": "explab.servers",
    "SamplingParams": "explab.generation", "GenerationRequest": "explab.servers",
    # data and embeddings
    "load_dataset": "explab.data", "read_rows": "explab.data", "register_synthetic": "explab.data",
    "collect": "explab.data", "plain_frame": "explab.data", "class_label_names": "explab.data",
    "embed": "explab.embeddings", "EmbedOptions": "explab.embeddings", "to_pil": "explab.images",
    # seeds
    "derive_seed": "explab.seeds", "rng_for": "explab.seeds",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'explab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
