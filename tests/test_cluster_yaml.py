"""cluster.yaml is a valid Ray cluster launcher config (Ray's own JSON schema) with the layout explab needs."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_valid_against_rays_schema(cluster):
    jsonschema.validate(cluster, SCHEMA)


@pytest.mark.parametrize("breakage", ["misspelt top-level key", "bad type", "node type without resources"])
def test_a_broken_copy_fails(cluster, breakage):
    broken = copy.deepcopy(cluster)
    if breakage == "misspelt top-level key":
        broken["setup_comands"] = broken.pop("setup_commands")
    elif breakage == "bad type":
        broken["max_workers"] = "eight"
    else:
        del broken["available_node_types"]["gpu_h100x1"]["resources"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_cpu_head_and_h100_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpus = {name: t["resources"]["GPU"] for name, t in types.items() if t["resources"].get("GPU")}
    assert sorted(gpus.values()) == [1, 8]
    for name in gpus:
        node = types[name]
        assert 0 <= node["min_workers"] <= node["max_workers"] <= cluster["max_workers"]
        setup = " ".join(node["worker_setup_commands"])
        assert '[gpu]"' in setup and "pip install" in setup  # GPU nodes get vLLM and DeepSpeed
    assert not any("[gpu]" in c for c in cluster["setup_commands"])  # the head does not


def test_dashboard_on_localhost_and_metrics_exported(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "--metrics-export-port=8080" in head
    assert "--metrics-export-port=8080" in " ".join(cluster["worker_start_ray_commands"])
    assert cluster["file_mounts"] == {"/home/ubuntu/explab": "."}
    assert any("dashboards/" in c for c in cluster["head_setup_commands"])


def test_rays_own_checks(cluster):
    """The cluster launcher's validation beyond the schema (defaults filled in, node types consistent)."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.fillout_defaults(copy.deepcopy(cluster)))
    broken = copy.deepcopy(cluster)
    broken["head_node_type"] = "cpu_head"
    with pytest.raises(ValueError, match="head_node_type"):
        util.validate_config(util.fillout_defaults(broken))
