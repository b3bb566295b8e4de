import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One embedded Ray instance for the whole test session (no dashboard: faster start)."""
    import ray

    from explab import runtime

    os.environ.setdefault("EXPLAB_RAY_DIR", "/tmp/ray-explab-tests")
    info = runtime.init(num_cpus=4, dashboard=False)
    yield info
    if ray.is_initialized():
        runtime.shutdown()
