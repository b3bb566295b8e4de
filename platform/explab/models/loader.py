"""`load_model`: the one loader every job and server uses (tiny presets, local dirs, hub ids)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from explab.errors import ModelError
from explab.models.gguf import converted_checkpoint, gguf_path
from explab.models.loaded import (  # noqa: F401 - LoadedModel and the resolvers stay importable from here
    KINDS,
    LoadedModel,
    check_kind,
    finish,
    resolve_device,
    resolve_dtype,
    vae_processor,
)
from explab.models.pruned import is_pruned, load_pruned
from explab.models.spec import ModelSpec
from explab.models.tiny import build_tiny


def load_model(spec: ModelSpec | str | dict[str, Any]) -> LoadedModel:
    """Load a model by ``tiny:<family>``, GGUF checkpoint, local directory, or Hugging Face hub id.

    A GGUF checkpoint (see `explab.models.gguf`) is converted once into the explab cache and loaded
    from there; its ``source`` is ``gguf:<file>``.

    Raises ModelError (one line: what is wrong and how to fix it) for an unknown preset, a missing
    path, an unreachable hub id, or a model of another kind than ``spec.kind``. Loading leaves the
    global (CPU) torch RNG untouched.
    """
    spec = ModelSpec.of(spec)
    if spec.is_tiny:
        return build_tiny(spec)
    gguf = gguf_path(spec)
    if gguf is not None:
        checkpoint = converted_checkpoint(gguf)
        kind, config = _detect_local(checkpoint)
        return _load(spec, str(checkpoint), kind, config, source=f"gguf:{gguf}")
    path = Path(spec.name).expanduser()
    if path.is_dir():
        kind, config = _detect_local(path)
        return _load(spec, str(path.resolve()), kind, config, source=str(path.resolve()))
    if spec.name.startswith(("/", ".", "~")) or path.exists():
        raise ModelError(
            f"model path {spec.name!r} does not exist or is not a directory: "
            "give an existing model directory, a Hugging Face id, or a tiny:<family> preset"
        )
    kind, config = _detect_hub(spec)
    return _load(spec, spec.name, kind, config, source=f"hub:{spec.name}")


# ---------------------------------------------------------------- kind detection


def _detect_local(path: Path) -> tuple[str, dict[str, Any]]:
    for filename in ("open_clip_config.json", "model_index.json", "config.json"):
        if (path / filename).is_file():
            config = json.loads((path / filename).read_text())
            return _kind_of(filename, config, str(path)), config
    raise ModelError(
        f"model directory {str(path)!r} has no config.json, model_index.json or open_clip_config.json: "
        "point at a directory written by save_pretrained (or explab.models.save_tiny)"
    )


def _detect_hub(spec: ModelSpec) -> tuple[str, dict[str, Any]]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    first_error: Exception | None = None
    for filename in ("config.json", "open_clip_config.json", "model_index.json"):
        try:
            file = hf_hub_download(spec.name, filename, revision=spec.revision)
        except RemoteEntryNotFoundError as err:  # the repo exists but lacks this file: try the next
            first_error = first_error or err
            continue
        except Exception as err:  # offline, unknown repo, bad id or revision, gated
            raise _hub_error(spec.name, err) from err
        config = json.loads(Path(file).read_text())
        if filename == "config.json" and config.get("model_type") == "clip":
            continue  # an open_clip repo also ships an HF CLIPModel config.json
        return _kind_of(filename, config, spec.name), config
    raise _hub_error(spec.name, first_error or ValueError("no supported config file"))


def _hub_error(name: str, err: BaseException) -> ModelError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelError(
        f"could not load model {name!r} from the Hugging Face hub or a local path ({reason}): "
        "check the id, or give a local directory / a tiny:<family> preset"
    )


def _kind_of(filename: str, config: dict[str, Any], name: str) -> str:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if filename == "open_clip_config.json":
        return "clip"
    if filename == "model_index.json":  # a diffusers pipeline
        return "diffusion"
    if "_class_name" in config:  # a diffusers model
        if config["_class_name"] == "AutoencoderKL":
            return "vae"
        raise ModelError(
            f"model {name!r} is a diffusers {config['_class_name']}: only AutoencoderKL is supported"
        )
    model_type = config.get("model_type", "")
    architectures = config.get("architectures") or []
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "vlm"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or any(
        a.endswith("ForCausalLM") for a in architectures
    ):
        return "causal_lm"
    if "vision_config" in config and any(a.endswith("ForConditionalGeneration") for a in architectures):
        return "vlm"
    raise ModelError(
        f"model {name!r} has model_type {model_type!r} ({', '.join(architectures) or 'no architectures'}), "
        "which explab cannot load: use a causal LM, a LLaVA-style VLM, an open_clip model, an AutoencoderKL "
        "or a diffusers pipeline (model_index.json)"
    )


# ---------------------------------------------------------------- loading


def _load(spec: ModelSpec, where: str, kind: str, config: dict[str, Any], source: str) -> LoadedModel:
    check_kind(spec, kind)
    device = resolve_device(spec)
    dtype = resolve_dtype(spec, device)
    if "auto_map" in config and not spec.trust_remote_code and not _has_builtin(config):
        raise ModelError(
            f"model {spec.name!r} needs custom code from its repository: "
            "set trust_remote_code: true in the model spec if you trust it"
        )
    revision = None
    try:
        with torch.random.fork_rng(devices=[]):  # random init before the weights load
            if kind == "clip":
                local = where if Path(where).is_dir() else _download_open_clip(spec)
                revision = None if local == where else Path(local).name  # the hub snapshot's commit
                model, tokenizer, processor = _load_clip(local, dtype, device)
            elif kind == "diffusion":
                from explab.models.diffusion import load_pipeline, pipeline_family

                model = load_pipeline(where, spec.revision, dtype, device)
                flux = pipeline_family(model) == "flux"
                tokenizer, processor = (model.tokenizer_2 if flux else model.tokenizer), model.image_processor
            elif kind == "vae":
                from diffusers import AutoencoderKL

                model = AutoencoderKL.from_pretrained(where, revision=spec.revision, torch_dtype=dtype)
                model, tokenizer, processor = model.to(device), None, vae_processor(model)
            else:
                model, tokenizer, processor = _load_transformers(spec, where, kind, dtype, device)
    except ModelError:
        raise
    except (OSError, ValueError) as err:
        if source.startswith("hub:"):
            raise _hub_error(spec.name, err) from err
        raise ModelError(
            f"could not load the {kind} model in {where!r} ({err}): check the directory's files"
        ) from err
    return finish(model, tokenizer, processor, kind, spec, source, revision)


def _has_builtin(config: dict[str, Any]) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return config.get("model_type") in CONFIG_MAPPING_NAMES


def _load_transformers(
    spec: ModelSpec, where: str, kind: str, dtype: torch.dtype, device: torch.device
) -> tuple[Any, Any, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    common = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    auto = AutoModelForImageTextToText if kind == "vlm" else AutoModelForCausalLM
    if is_pruned(where):  # a structurally pruned checkpoint: shapes from its pruned.json
        model = load_pruned(where, kind, dtype, device, spec.trust_remote_code)
    else:
        model = auto.from_pretrained(where, dtype=dtype, **common).to(device)
    tokenizer = _load_tokenizer(where, common)
    if kind == "vlm":
        processor = AutoProcessor.from_pretrained(where, tokenizer=tokenizer, **common)
        return model, processor.tokenizer, processor
    return model, tokenizer, None


def _load_tokenizer(where: str, common: dict[str, Any]) -> Any:
    """AutoTokenizer, except that a tokenizer saved as the generic fast backend is read as saved.

    (AutoTokenizer swaps in the model type's own class for some types, e.g. qwen2, which rebuilds
    the tokenizer with that family's normalizer and pre-tokenizer.)
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    declared = get_tokenizer_config(where, revision=common["revision"]).get("tokenizer_class")
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(where, revision=common["revision"])
    return AutoTokenizer.from_pretrained(where, **common)


def _load_clip(local: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any, Any]:
    import open_clip

    precision = {torch.float32: "fp32", torch.float16: "pure_fp16", torch.bfloat16: "pure_bf16"}[dtype]
    model, _, preprocess = open_clip.create_model_and_transforms(
        f"local-dir:{local}", precision=precision, device=device
    )
    return model, open_clip.get_tokenizer(f"local-dir:{local}"), preprocess


def _download_open_clip(spec: ModelSpec) -> str:
    """Fetch an open_clip hub repo's config + weights at ``spec.revision``; returns the snapshot dir."""
    from huggingface_hub import hf_hub_download

    config = hf_hub_download(spec.name, "open_clip_config.json", revision=spec.revision)
    for weights in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        try:
            hf_hub_download(spec.name, weights, revision=spec.revision)
            break
        except Exception:  # noqa: BLE001 - try the next weight file name
            continue
    return str(Path(config).parent)
