#!/usr/bin/env bash
# The GPU checks, on a CUDA machine that has PyTorch: the `gpu`-marked tests (tests/test_gpu.py: bf16 loading,
# the in-place KV cache and the prefix cache on CUDA, a HookedModel actor on the GPU, DPO in bf16, tiny FLUX;
# tests/test_train_gpu.py: DeepSpeed ZeRO-2/3 through Ray Train), then benchmarks/servers.py on the GPU.
#
#   bash scripts/gpu-check.sh [OUT_DIR]
#
# An offline machine takes its missing packages from .whl/ (git-ignored): wheels, .tar.gz source
# distributions (DeepSpeed) and .tar.xz archives unpacked as they are (a Ray wheel's tree without its Java
# jars and dashboard build fits the 64 MiB a lent machine takes); they install into /tmp/site.
set -uo pipefail
out=${OUT:-${1:-gpu-out}}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  for t in .whl/*.tar.xz; do [ -e "$t" ] && tar xJf "$t" -C /tmp/site; done
  for s in .whl/*.tar.gz; do
    [ -e "$s" ] && DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation \
      --no-cache-dir --target /tmp/site "$s"
  done
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/platform:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# DeepSpeed's JIT op builder cannot parse arch names such as "9.0a" (Hopper's): name the plain capability
cc=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST_OVERRIDE:-$cc}
tests=${GPU_TESTS:-tests/test_gpu.py tests/test_train_gpu.py tests/test_finer_openended.py}
bench=${GPU_BENCH:---layers 16 --hidden 2048 --requests 256 --tokens 128 --new-tokens 64 --repeats 2}
nvidia-smi -L
python3 -c "import torch, transformers, ray; print('torch', torch.__version__, 'transformers', transformers.__version__,
'ray', ray.__version__, 'cuda', torch.cuda.is_available())"
timeout 330 python3 -m pytest -q -p no:cacheprovider -m gpu -o addopts="-ra" $tests \
  2>&1 | tee "$out/pytest.log"
timeout ${GPU_BENCH_TIMEOUT:-200} python3 benchmarks/servers.py --num-gpus 0.5 --callers 64 --max-batch 64 $bench \
  2>&1 | tee "$out/servers.log"
