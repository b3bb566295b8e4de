"""The platform's import graph: each layer imports only layers below it, no module circle, and jobs
import only public names. Read from the source (every import, at module level or inside a function)."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PLATFORM = ROOT / "platform" / "explab"

# explab.<part> → its layer; a part imports only parts of a strictly lower layer (`explab/__init__`
# re-exports lazily and is not a layer). cli → jobs_api/demo → sweep → embeddings/sweep_report → runs
# → servers → models/interventions/job registry/sweep spec → data/config/... → errors and the leaves.
LAYERS = {
    "errors": 0, "vectors": 0, "threads": 0, "mirror": 0, "telemetry": 0, "seeds": 0,
    "cache": 1, "store": 1, "paths": 1, "runtime": 1, "config": 1, "images": 1, "generation": 1, "data": 1, "shapes": 1,
    "models": 2, "interventions": 2, "job": 2, "sweep_spec": 2,
    "servers": 3, "train": 3, "plan": 4,
    "runs": 4,
    "embeddings": 5, "sweep_report": 5,
    "sweep": 6,
    "jobs_api": 7, "demo": 7, "pull": 8,
    "cli": 9,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PLATFORM.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The explab modules ``path`` imports anywhere in it (``from explab import x`` names explab.x, and
    ``from explab.a import b`` names the submodule explab.a.b when b is one)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "explab":
            if node.module == "explab":
                found |= {f"explab.{a.name}" for a in node.names if a.name != "__version__"}
            else:
                subs = {f"{node.module}.{a.name}" for a in node.names} & _FILES
                found |= subs
                if len(subs) < len(node.names):  # names defined in the module itself
                    found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "explab"}
    return found


_FILES = {_module_name(p) for p in PLATFORM.rglob("*.py")}
MODULES = {_module_name(p): p for p in sorted(PLATFORM.rglob("*.py"))}
GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_platform_part_has_a_layer():
    parts = {_part(m) for m in MODULES} - {""}
    assert parts == set(LAYERS), f"give these parts a layer: {sorted(parts ^ set(LAYERS))}"


def test_each_layer_imports_only_layers_below_it():
    upward = [f"{src} -> {dst}" for src, dsts in GRAPH.items() if _part(src)
              for dst in dsts if _part(dst) not in ("", _part(src)) and LAYERS[_part(dst)] >= LAYERS[_part(src)]]
    assert not upward, "imports of a higher (or the same) layer: " + ", ".join(sorted(upward))


def test_no_module_imports_itself_back_through_a_circle():
    # edges between modules; a submodule importing its own package's __init__ does not count
    graph = {src: {d for d in dsts if d in MODULES and not src.startswith(d + ".")} for src, dsts in GRAPH.items()}
    state: dict[str, int] = {}
    circles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else nxt)
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles: " + "; ".join(circles)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_platform_module_imports(module):
    importlib.import_module(module)


def test_jobs_import_only_public_platform_names():
    # a job imports from explab itself or one of its parts (explab.<part>), never a package's
    # inner module (explab.servers.prompts, explab.models.loader) nor a private name
    bad = []
    for path in sorted((ROOT / "jobs").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "explab"):
                continue
            inner = node.module.count(".") > 1 or (node.module.count(".") == 1 and _part(node.module) not in LAYERS)
            private = [a.name for a in node.names if a.name.startswith("_")]
            if inner or private:
                bad.append(f"{path.relative_to(ROOT)}: from {node.module} import "
                           f"{', '.join(a.name for a in node.names)}")
    assert not bad, "\n".join(bad)


def test_import_explab_is_light_and_exports_what_jobs_use():
    import subprocess
    import sys

    code = ("import sys, explab; heavy = [m for m in ('torch', 'ray', 'pandas', 'transformers') if m in sys.modules]; "
            "print(heavy); from explab import Job, JobConfig, RunContext, ModelSpec, EncoderSpec, derive_seed, embed; "
            "print(Job.__module__, RunContext.__module__, EncoderSpec.__module__, derive_seed.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "explab.job explab.runs explab.models.encoders explab.seeds"


def test_get_job_imports_that_job_alone():
    """`explab run`/`submit` and every sweep trial look their job up by name: only its package is imported
    (importing every job costs seconds of torch/transformers/sklearn imports per process)."""
    import subprocess
    import sys

    code = ("import sys; from explab.job import get_job; job = get_job('quadratic'); print(job.name, job.package, "
            "sorted(m for m in sys.modules if m.startswith('jobs.') and m.count('.') == 1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split("\n")[0] == "quadratic jobs.quadratic ['jobs.quadratic']"
    from explab.errors import ExplabError
    from explab.job import discover, get_job

    assert get_job("quickstart") == discover()["quickstart"]
    with pytest.raises(ExplabError, match="unknown job 'nosuchjob': known jobs are .*quadratic"):
        get_job("nosuchjob")
