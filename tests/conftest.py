import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the S3-compatible server of tests/test_mirror.py (started there, on 127.0.0.1): its address and fake
# credentials are set before any Ray starts, so that Ray's workers (sweep trials) can reach it too
S3_PORT = _free_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="explab-tests",
                  AWS_SECRET_ACCESS_KEY="explab-tests", AWS_DEFAULT_REGION="us-east-1",
                  AWS_EC2_METADATA_DISABLED="true")


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


@pytest.fixture
def cli(monkeypatch, capsys):
    """The `explab` command line in-process: ``code, out, err = cli("run", "quickstart", ...)``."""
    from explab.cli import main

    def invoke(*args):
        monkeypatch.setattr(sys, "argv", ["explab", *args])
        with pytest.raises(SystemExit) as info:
            main()
        out = capsys.readouterr()
        return info.value.code, out.out, out.err

    return invoke


# ---- a real local Ray head (Ray Jobs API, Prometheus metrics) ----------------------------------------
# Started once per session by `ray start --head --block` in its own process tree, with every port
# free-picked so that it never meets the embedded `ray_local` cluster or another suite's head; torn
# down by terminating that process tree (never `ray stop`, which would also stop `ray_local`).
HEAD_START_TIMEOUT_S = 120


def _free_ports(n):
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_stat(pid):
    """(parent pid, state, start time) of a process, from /proc (Linux); None when it is gone."""
    from pathlib import Path

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0], fields[19]


def _descendants(pid):
    """Every process below ``pid`` as (pid, start time): the start time tells a reused pid apart."""
    from pathlib import Path

    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append((int(entry.name), stat[2]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _alive(proc):
    stat = _proc_stat(proc[0])
    return stat is not None and stat[1] != "Z" and stat[2] == proc[1]


class RayHead:
    def __init__(self, proc, temp_dir, gcs_port, dashboard_port, metrics_port, log_path):
        self.proc = proc
        self.temp_dir = temp_dir
        self.gcs_address = f"127.0.0.1:{gcs_port}"
        self.address = f"http://127.0.0.1:{dashboard_port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.log_path = log_path

    def client(self):
        from explab import jobs_api

        return jobs_api.client(self.address)

    def scrape(self) -> str:
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return response.read().decode()


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real local Ray head with its dashboard (Jobs API) and a metrics export port."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request
    from pathlib import Path

    gcs, dashboard, metrics, client, agent_http, agent_grpc, runtime_env, node_mgr, obj_mgr = _free_ports(9)
    temp_dir = f"/tmp/ray-explab-head-{os.getpid()}"
    log_path = tmp_path_factory.mktemp("ray-head") / "head.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # the job's entrypoint says `python`: make it this environment's
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # at teardown, stop at once (no 30 s drain)
    ray_bin = Path(sys.executable).parent / "ray"
    cmd = [str(ray_bin) if ray_bin.exists() else "ray", "start", "--head", "--block",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           "--metrics-export-port", str(metrics), "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--runtime-env-agent-port", str(runtime_env), "--node-manager-port", str(node_mgr),
           "--object-manager-port", str(obj_mgr), "--temp-dir", temp_dir, "--num-cpus", "2",
           "--include-dashboard", "true", "--disable-usage-stats"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(proc, temp_dir, gcs, dashboard, metrics, log_path)
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{head.address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401 without a token: the API answers
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray dashboard did not answer in {HEAD_START_TIMEOUT_S} s:\n"
                                   f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        # the Jobs API needs the dashboard's job module and the head's agent: wait until it lists jobs
        while True:
            try:
                head.client().list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield head
    finally:
        tree = _descendants(proc.pid)
        proc.terminate()  # `ray start --block` takes its children down when terminated
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = [p for p in tree if _alive(p)]
        for pid, _ in alive:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not alive, f"processes of the test's Ray head outlived it: {alive}"


def prometheus_samples(text):
    """(name, labels, value) of every sample in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


class HeadJobs:
    """Jobs submitted through `explab submit` to the test head, and the explab metrics seen meanwhile."""

    def __init__(self, head, runs_dir):
        self.head = head
        self.runs_dir = runs_dir
        self.ids = {}
        self.status = {}
        self.samples = {}  # name -> {series: (labels, last value seen)}, every explab series scraped so far
        self.sweep_file = os.path.join(ROOT, HEAD_SWEEP)  # the submitted sweep's spec

    def scrape(self):
        try:
            text = self.head.scrape()
        except OSError:
            return
        for name, labels, value in prometheus_samples(text):
            if name.startswith("ray_explab_"):
                self.samples.setdefault(name, {})[tuple(sorted(labels.items()))] = (labels, value)

    def values(self, name, **tags):
        """The last value of every series of ``name`` whose labels include ``tags``."""
        return [value for labels, value in self.samples.get(name, {}).values()
                if all(labels.get(k) == v for k, v in tags.items())]

    def runs_ended_in_export(self):
        """Whether the export has shown every run under the runs dir (not a sweep's trials) start and
        end, and every completed run's progress at 1: the last values its driver sends."""
        import json

        for job_dir in (p for p in self.runs_dir.iterdir() if p.is_dir() and p.name != "sweeps"):
            manifests = [json.loads(p.read_text()) for p in job_dir.glob("*/manifest.json")]
            tags = {"explab_job": job_dir.name, "sweep": ""}
            ended = sum(sum(self.values(f"ray_explab_runs_{state}_total", **tags))
                        for state in ("completed", "failed", "stopped"))
            if sum(self.values("ray_explab_runs_started_total", **tags)) != len(manifests) or ended != len(manifests):
                return False
            if any(self.values("ray_explab_run_progress", **tags, run=m["run_id"]) != [1.0]
                   for m in manifests if m["status"] == "completed"):
                return False
        return True

    def scrape_until(self, names, timeout_s):
        import time

        deadline = time.monotonic() + timeout_s
        while not set(names) <= set(self.samples) and time.monotonic() < deadline:
            self.scrape()
            time.sleep(1)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project
HEAD_SWEEP = "tests/head_sweep.yaml"  # jobs/quadratic/sweep.yaml with 4 trials instead of 24
HEAD_JOBS = {
    # a run that completes (its progress, logged and final metrics, server request metrics)
    "quickstart": ["quickstart", "-c", "tiny", "--set", "alphas=[0, 4, 8]", "--set", "questions=[Hi, Hello there]",
                   "--set", "max_tokens=8"],
    # a run that fails at run time inside the shared server (a model on the meta device holds no data, so
    # its activations cannot be copied out: a server error and a failed run; a bad layer is refused before
    # any request now, see test_reliability)
    "failing": ["quickstart", "-c", "tiny", "--set", "alphas=[0]", "--set", "questions=[Hi]",
                "--set", "model.device=meta"],
    # a sweep (trials are runs tagged with the sweep; ASHA stops some early)
    "sweep": ["--sweep", HEAD_SWEEP],
}


@pytest.fixture(scope="session")
def head_jobs(ray_head, tmp_path_factory):
    """Submits HEAD_JOBS to the test head at once through the CLI and waits for them (5 min at most),
    scraping the head's metrics every half second meanwhile (gauges leave the export ~20 s after a run),
    then until the runs' last values are in the export (30 s at most)."""
    import subprocess
    import sys
    import time

    jobs = HeadJobs(ray_head, tmp_path_factory.mktemp("head-runs"))
    submitting = {}
    for name, args in HEAD_JOBS.items():
        if name == "sweep" and not os.path.isfile(os.path.join(ROOT, HEAD_SWEEP)):
            continue
        submitting[name] = subprocess.Popen(
            [sys.executable, "-m", "explab.cli", "submit", *args, "--runs-dir", str(jobs.runs_dir),
             "--address", ray_head.address], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in submitting.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        jobs.ids[name] = out.strip().splitlines()[-1]
    client = ray_head.client()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        jobs.scrape()
        jobs.status = {name: str(client.get_job_status(job_id).value) for name, job_id in jobs.ids.items()}
        if all(s in ("SUCCEEDED", "FAILED", "STOPPED") for s in jobs.status.values()):
            break
        time.sleep(0.5)
    deadline = time.monotonic() + 30  # the last drivers' final flush: until it is seen, not a fixed wait
    while not jobs.runs_ended_in_export() and time.monotonic() < deadline:
        time.sleep(0.5)
        jobs.scrape()
    return jobs
