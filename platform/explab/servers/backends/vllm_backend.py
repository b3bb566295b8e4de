"""Generation through vLLM's offline `LLM` engine (GPU, or vLLM's CPU build).

vLLM is imported only when a `VLLMBackend` is built, so this module imports without it. Prompts are
encoded with `explab.servers.prompts.encode_request`, the same function the transformers backend
uses, and handed to vLLM as token ids: both backends see identical prompt ids.

On vLLM's CPU build the engine runs in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``;
the multiprocess engine is ~50x slower on a 2-core machine and needs a ``__main__`` guard), in eager
mode, with an explicit KV cache size (by default vLLM's CPU worker reserves ``gpu_memory_utilization``
of the machine's RAM). Any of these can be overridden through the environment or ``engine_kwargs``.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

from explab.errors import ModelError
from explab.models.gguf import converted_checkpoint, gguf_path
from explab.models.spec import ModelSpec
from explab.servers.prompts import encode_request
from explab.servers.types import Completion, GenerationRequest, GenerationResult, SamplingParams

VLLM_MISSING = (
    "the vllm backend needs vLLM: pip install 'explab[gpu]' on a GPU machine, or use backend: transformers"
)
CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB: ~4M tokens of a tiny model, ~16k of a 1B Llama in fp32
_IN_PROCESS: weakref.WeakSet[VLLMBackend] = weakref.WeakSet()  # live in-process engines


def vllm_available() -> bool:
    """Whether vLLM can be imported (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def gpu_available() -> bool:
    """Whether torch sees a CUDA GPU."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class VLLMBackend:
    """Batched generation with `vllm.LLM`; one `generate` call serves a whole batch of requests."""

    name = "vllm"

    def __init__(
        self,
        spec: ModelSpec | str,
        *,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ):
        self.spec = ModelSpec.of(spec)
        if not vllm_available():
            raise ModelError(VLLM_MISSING)
        if self.spec.kind not in ("auto", "causal_lm"):
            raise ModelError(
                f"the vllm backend serves causal LMs, but model {self.spec.name!r} has kind={self.spec.kind!r}: "
                "use a causal LM or set kind to 'causal_lm'"
            )
        on_cpu = not gpu_available()
        if on_cpu:
            # Must be set before the engine is built (vllm.envs reads it lazily).
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm
        except ImportError as err:
            raise ModelError(f"{VLLM_MISSING} (import failed: {err})") from err

        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        self.on_cpu = on_cpu
        self.llm: Any = None
        self.model_path = self._model_path()
        if on_cpu:
            _check_cpu_head_dim(self.model_path, self.spec.name)
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        if self.in_process:
            gc.collect()  # an unreferenced engine shuts down now, not in the middle of this one's life
        if self.in_process and any(b.llm is not None for b in _IN_PROCESS):
            raise ModelError(
                "another vLLM engine is already live in this process (vLLM's in-process engine keeps "
                "global state, and one engine's shutdown breaks the others): close() the other "
                "VLLMBackend first, or serve each model from its own server actor"
            )
        kwargs: dict[str, Any] = {
            "model": self.model_path,
            "tokenizer": self.model_path,
            "revision": self.spec.revision,
            "tokenizer_revision": self.spec.revision,
            "trust_remote_code": self.spec.trust_remote_code,
            "dtype": self._dtype(on_cpu),
            "seed": 0,
            "gpu_memory_utilization": gpu_memory_utilization,
        }
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if on_cpu:
            kwargs["enforce_eager"] = True  # inductor compilation takes minutes on a small CPU
            if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        kwargs.update(engine_kwargs or {})
        try:
            self.llm = vllm.LLM(**kwargs)
        except (OSError, ValueError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(
                f"vLLM could not load model {self.spec.name!r} ({reason}): check the model id or path, "
                "its dtype, and max_model_len / engine_kwargs"
            ) from err
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        if self.in_process:
            _IN_PROCESS.add(self)

    def close(self) -> None:
        """Shut the engine down and free its memory (another engine can then start in this process)."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()

    # ------------------------------------------------------------------ setup

    def _model_path(self) -> str:
        """What vLLM loads: a saved ``tiny:`` preset, a converted GGUF checkpoint, a local dir or a hub id."""
        if self.spec.is_tiny:
            return str(_saved_tiny(self.spec))
        gguf = gguf_path(self.spec)
        if gguf is not None:  # vLLM cannot read the .gguf file: serve the same weights converted once
            return str(converted_checkpoint(gguf))
        path = Path(self.spec.name).expanduser()
        if path.is_dir():
            return str(path.resolve())
        if self.spec.name.startswith(("/", ".", "~")) or path.exists():
            raise ModelError(
                f"model path {self.spec.name!r} does not exist or is not a directory: "
                "give an existing model directory, a Hugging Face id, or a tiny:<family> preset"
            )
        return self.spec.name

    def _dtype(self, on_cpu: bool) -> str:
        if not on_cpu:
            return self.spec.dtype  # "auto": vLLM picks from the checkpoint's config
        # float32, bfloat16 and float16 all run on vLLM's CPU build; "auto" resolves as the
        # transformers backend does on a CPU, so both backends compute in the same precision
        return "float32" if self.spec.dtype == "auto" else self.spec.dtype

    # ------------------------------------------------------------------ generation

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Generate for every request in one `llm.generate` call; results in request order."""
        if not requests:
            return []
        if self.llm is None:
            raise ModelError("this VLLMBackend was closed: build a new one to generate")
        prompts = [encode_request(self.tokenizer, r) for r in requests]
        for ids in prompts:
            if len(ids) >= self.max_model_len:
                raise ModelError(
                    f"a prompt of {len(ids)} tokens does not fit max_model_len={self.max_model_len}: "
                    "shorten the prompt or raise max_model_len"
                )
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompts],
            [self._sampling_params(r.params) for r in requests],
            use_tqdm=False,
        )
        results = []
        for ids, request, output in zip(prompts, requests, outputs, strict=True):
            completions = [
                _completion(c, request.params, self.tokenizer)
                for c in sorted(output.outputs, key=lambda c: c.index)
            ]
            if len(completions) < request.params.n:  # greedy: vLLM samples once, the n copies are equal
                completions = [completions[0].model_copy(deep=True) for _ in range(request.params.n)]
            results.append(GenerationResult(prompt_token_ids=ids, completions=completions))
        return results

    @staticmethod
    def _sampling_params(params: SamplingParams) -> Any:
        from vllm import SamplingParams as VLLMSamplingParams

        greedy = params.temperature == 0
        return VLLMSamplingParams(
            n=1 if greedy else params.n,  # vLLM refuses n > 1 with greedy sampling
            temperature=params.temperature,
            top_p=params.top_p,
            **({"top_k": params.top_k} if params.top_k else {}),  # 0: vLLM's default (no top-k cut)
            max_tokens=params.max_tokens,
            seed=params.seed,
            stop=list(params.stop) or None,
            ignore_eos=params.ignore_eos,
            include_stop_str_in_output=False,
            logprobs=0 if params.logprobs else None,  # 0: only the sampled token's logprob
        )


def _completion(output: Any, params: SamplingParams, tokenizer: Any) -> Completion:
    """One vLLM `CompletionOutput` as a `Completion`.

    ``token_ids`` are vLLM's: they end with the eos / stop token, or with the token that completed a
    stop string. ``text`` is ``tokenizer.decode(token_ids, skip_special_tokens=True)`` cut before the
    first stop string, rather than vLLM's incremental text, which holds back bytes of an incomplete
    UTF-8 character and so can differ from a plain decode (tiny random models emit such bytes).
    """
    token_ids = list(output.token_ids)
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    if isinstance(output.stop_reason, str):  # a stop string matched
        cuts = [i for i in (text.find(s) for s in params.stop) if i >= 0]
        text = text[: min(cuts)] if cuts else output.text
    logprobs = None
    if params.logprobs:
        logprobs = [float(step[tok].logprob) for tok, step in zip(token_ids, output.logprobs, strict=True)]
    finish = "length" if output.finish_reason == "length" else "stop"
    return Completion(text=text, token_ids=token_ids, logprobs=logprobs, finish_reason=finish)


def _check_cpu_head_dim(model_path: str, name: str) -> None:
    """vLLM's CPU attention kernels support only some head sizes (not 16): say so before loading."""
    import json

    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # moved in another vLLM release: let vLLM report it
        return
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    config = config.get("text_config", config)
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (
        config["hidden_size"] // heads if heads and "hidden_size" in config else None
    )
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim is not None and head_dim not in supported:
        raise ModelError(
            f"model {name!r} has attention head size {head_dim}, which vLLM's CPU backend does not support "
            f"({', '.join(map(str, supported))}): use a model with one of those head sizes "
            "(for a tiny: preset, e.g. tiny: {hidden_size: 128}), or backend: transformers"
        )


def _saved_tiny(spec: ModelSpec) -> Path:
    """Write the ``tiny:`` preset once per (family, overrides) and return its directory."""
    from explab.models.tiny import save_tiny

    weights_spec = ModelSpec(name=spec.name, tiny=spec.tiny)  # dtype/device do not change the files
    from explab import mirror

    location = os.environ.get("EXPLAB_CACHE")
    if not location or mirror.is_uri(location):  # cheap to rebuild: an object-store cache is not worth a trip
        location = str(Path(tempfile.gettempdir()) / "explab-cache")
    root = Path(location) / "tiny"
    path = root / weights_spec.key
    if (path / "config.json").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{weights_spec.key}-", dir=root))
    save_tiny(weights_spec, staging)
    try:
        staging.rename(path)
    except OSError:  # another process saved it first
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return path
