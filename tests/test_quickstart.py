"""The quickstart job end to end on the embedded cluster: the steering it reports is real."""

import pandas as pd

from explab.config import load_config
from explab.job import get_job
from explab.runs import execute


def test_quickstart_tiny_steers_along_the_contrastive_direction(tmp_path, ray_local):
    job = get_job("quickstart")
    config = load_config(job.config, job.config_path("tiny"))
    run_dir, result = execute(job, config, tmp_path)
    summary = pd.read_parquet(run_dir / "tables" / "summary.parquet").sort_values("alpha")
    # the projection on the unit direction downstream moves by about alpha (the residual carries it)
    assert result["monotonic"] == 1.0 and 0.8 < result["slope"] < 1.2
    base = summary.loc[summary["alpha"] == 0.0, "changed"].item()
    assert base == 0.0 and result["changed_at_max_alpha"] > 0.0
    assert (run_dir / "plots" / "projection_vs_alpha.png").stat().st_size > 1000
    assert (run_dir / "artifacts" / "direction.safetensors").is_file()
