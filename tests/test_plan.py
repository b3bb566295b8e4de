"""`explab run JOB -c paper --dry-run`: the plan of servers, tasks, GPUs and memory, without GPUs or Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from explab.config import load_config
from explab.errors import ConfigError
from explab.job import get_job
from explab.plan import check_model_id, make_plan, memory_gb, read_cluster

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
PAPER_JOBS = ["cot_robustness", "apm", "polylogue", "ezpc", "sotalign"]


def _paper(job, overrides=()):
    spec = get_job(job)
    return load_config(spec.config, spec.config_path("paper"), list(overrides))


def test_model_ids_and_memory_from_names():
    assert check_model_id("Qwen/Qwen2.5-32B-Instruct") is None and check_model_id("tiny:llama") is None
    assert check_model_id("open_clip:ViT-B-32/openai") is None and check_model_id("./local/dir") is None
    for bad in ("Qwen2.5-32B", "a//b", "owner/na me", "tiny:"):
        assert check_model_id(bad) is not None, bad
    assert memory_gb("Qwen/Qwen2.5-32B-Instruct") == 64.0 and memory_gb("deepseek-ai/R1-Distill-Qwen-1.5B") == 3.0
    assert memory_gb("microsoft/Phi-4-reasoning-plus") is None


def test_cot_paper_plan_sums_every_server_once_and_compares_with_the_cluster():
    plan = make_plan("cot_robustness", _paper("cot_robustness"), CLUSTER)
    servers = [n for n in plan.needs if n.kind == "server"]
    assert len(servers) == 10  # nine evaluated models + the intervention LLM, which is also the judge
    assert plan.gpus == 14 and plan.ok
    assert {n.name: n.gpus for n in plan.nodes} == {"head": 0, "gpu_h100x1": 1, "gpu_h100x8": 8}
    assert any("on one node of: none" in note for note in plan.notes)  # all at once it fits no node
    names = [t.name for t in read_cluster(CLUSTER)]
    assert names == ["head", "gpu_h100x1", "gpu_h100x8"]


def test_a_bad_model_id_or_a_server_larger_than_any_node_is_a_problem():
    plan = make_plan("cot_robustness", _paper("cot_robustness", ["models=[{model: {name: not-a-hub-id}}]"]), CLUSTER)
    assert any("not-a-hub-id" in p for p in plan.problems) and not plan.ok
    big = "intervention_server={num_gpus: 16, backend: vllm}"
    plan = make_plan("cot_robustness", _paper("cot_robustness", [big]), CLUSTER)
    assert any("needs 16 GPUs on one node" in p for p in plan.problems)
    with pytest.raises(ConfigError, match="not found"):
        read_cluster(ROOT / "nope.yaml")


@pytest.mark.parametrize("job", PAPER_JOBS)
def test_every_paper_config_passes_the_dry_run(job, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = cli("run", job, "-c", "paper", "--dry-run", "--runs-dir", str(tmp_path / "runs"))
    assert code == 0, err
    assert "GPUs if all at once:" in out and "cluster node types" in out
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_cot_dry_run_prints_its_waves(cli, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, _ = cli("run", "cot_robustness", "-c", "paper", "--dry-run")
    assert code == 0 and "2 wave(s) on a 8-GPU node: peak 8 GPUs" in out.replace("\n", " ")
