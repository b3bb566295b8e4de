from pathlib import Path

import pytest

from explab.config import JobConfig, Section, apply_overrides, load_config, parse_override
from explab.errors import ConfigError


class Inner(Section):
    name: str = "tiny:llama"
    layers: list[int] = [1]


class Cfg(JobConfig):
    lr: float = 0.1
    steps: int = 3
    model: Inner = Inner()


def test_overrides_parse_yaml_values_and_nest():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    assert parse_override("flag=true") == (["flag"], True)
    assert apply_overrides({"model": {"name": "a"}}, ["model.layers=[2,3]", "lr=0.5"]) == {
        "model": {"name": "a", "layers": [2, 3]},
        "lr": 0.5,
    }


def test_load_config_from_yaml_with_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.2\nmodel:\n  name: tiny:qwen\n")
    cfg = load_config(Cfg, path, ["steps=7", "model.layers=[4]"])
    assert (cfg.lr, cfg.steps, cfg.model.name, cfg.model.layers, cfg.seed) == (0.2, 7, "tiny:qwen", [4], 0)


@pytest.mark.parametrize(
    "text, overrides, needle",
    [
        ("lr: [oops\n", [], "not valid YAML at line"),
        ("- 1\n- 2\n", [], "must hold a mapping"),
        ("lr: 0.1\nbogus: 1\n", [], "field 'bogus': unknown field"),
        ("lr: fast\n", [], "field 'lr'"),
        ("", ["steps"], "not of the form key=value"),
        ("", ["model.nme=x"], "field 'model.nme': unknown field"),
        ("lr: 0.1\n", ["lr.x=1"], "'lr' is a value, not a section"),
    ],
)
def test_bad_configs_give_one_clear_line(tmp_path: Path, text, overrides, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(Cfg, path, overrides)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_missing_config_file_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "nope.yaml")


def test_one_dotted_setter_refuses_a_path_through_a_value_for_overrides_and_sweeps():
    from explab import sweep
    from explab.config import set_dotted

    assert sweep.set_dotted is set_dotted  # the sweep's trials and --set go through the same setter
    data = {"model": "tiny:llama", "opt": None, "lr": 0.1}
    # through a null section: made, in both
    assert set_dotted(data, "opt.lr", 1.0)["opt"] == {"lr": 1.0}
    assert apply_overrides(data, ["opt.lr=1.0"])["opt"] == {"lr": 1.0}
    # through a value (the disputed case): refused, in both, with one line naming the part
    for attempt in (lambda: set_dotted(data, "model.name", "tiny:qwen"),
                    lambda: apply_overrides(data, ["model.name=tiny:qwen"])):
        with pytest.raises(ConfigError, match=r"'model' is a value, not a section \(it holds a str\)"):
            attempt()
    assert data == {"model": "tiny:llama", "opt": None, "lr": 0.1}  # the input is never changed
