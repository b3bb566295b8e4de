"""The command line: clear one-line errors, no run directory on bad input, real runs, runs listing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "nosuchjob"], "unknown job 'nosuchjob'"),
        (["run", "quickstart", "-c", "missing.yaml"], "does not exist"),
        (["run", "quickstart", "-c", "nosuchname"], "neither a file nor one of job 'quickstart'"),
        (["run", "quickstart", "--set", "alphas"], "not of the form key=value"),
        (["run", "quickstart", "--set", "bogus=1"], "field 'bogus': unknown field"),
        (["run", "quickstart", "--set", "max_tokens=lots"], "field 'max_tokens'"),
        (["run", "quickstart", "--set", "model.nmae=tiny:llama"], "field 'model.nmae'"),
        (["run", "quickstart", "--set", "server.backend=tpu"], "field 'server.backend'"),
        (["show", "no-such-run"], "no run 'no-such-run'"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(monkeypatch, tmp_path, args, needle, cli):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(*args, "--runs-dir", str(tmp_path / "runs"))
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "runs").exists()


def test_malformed_yaml_names_the_line(tmp_path, cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: tiny:llama\n alphas: [1\n")
    code, _, err = cli("run", "quickstart", "-c", str(bad), "--runs-dir", str(tmp_path / "r"))
    assert code != 0 and "not valid YAML at line" in err and not (tmp_path / "r").exists()


def test_jobs_lists_registered_jobs(cli):
    code, out, _ = cli("jobs")
    assert code == 0 and "quickstart" in out


def test_run_prints_run_dir_last_and_show_reads_it(tmp_path, ray_local, cli):
    runs = tmp_path / "runs"
    code, out, err = cli("run", "quickstart", "-c", "tiny", "--set", "alphas=[0, 8]",
                         "--set", "questions=[Hi, Hello there]", "--runs-dir", str(runs))
    assert code == 0, err
    run_dir = Path(out.strip().splitlines()[-1])
    assert run_dir.parent == runs / "quickstart"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["models"][0]["name"] == "tiny:llama"
    code, out, _ = cli("runs", "--runs-dir", str(runs))
    assert code == 0 and run_dir.name in out
    code, out, _ = cli("show", run_dir.name[:17], "--runs-dir", str(runs))
    assert code == 0 and "tables/steering.parquet" in out and out.strip().splitlines()[-1] == str(run_dir)


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "explab.cli", "run", "quickstart", "--set", "nope=1",
                           "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "field 'nope': unknown field" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_servers_lists_and_stops(ray_local, cli):
    from explab.servers import get_server

    handle = get_server("hooked", {"name": "tiny:gpt2"})
    code, out, _ = cli("servers")
    assert code == 0 and handle.name in out and "tiny:gpt2" in out
    code, out, _ = cli("servers", "--stop", handle.name)
    assert code == 0 and f"stopped {handle.name}" in out
    code, out, err = cli("servers", "--stop", handle.name)
    assert code != 0 and "no explab server named" in err
