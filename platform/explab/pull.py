"""``explab pull JOB_ID``: bring a submitted job's run (or sweep) directory back from the cluster.

Only the Ray Jobs API is needed (the same dashboard address as ``explab submit``): the job's log
names its run directory (``explab run``/``explab sweep`` print it last), a small follow-up job
(``python -m explab.pull DIR``, with this explab as its ``py_modules``) packs that directory as a
base64 tar.gz between two marker lines of its own log, and this side unpacks it under the local
runs dir with the same ``<job>/<run-id>`` (or ``sweeps/<job>/<sweep-id>``) layout. Files above
`MAX_FILE_MB` (model weights, large artifacts) stay on the cluster and are listed.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import tarfile
from pathlib import Path

from explab.errors import ExplabError

BEGIN, END = "----- explab pull: begin -----", "----- explab pull: end -----"
MAX_FILE_MB = 64.0
PACK_TIMEOUT_S = 300.0


# ---- cluster side ---------------------------------------------------------------------------------
def pack(run_dir: Path, max_file_mb: float = MAX_FILE_MB) -> tuple[bytes, list[str]]:
    """A tar.gz of ``run_dir`` (paths relative to it) without files above ``max_file_mb``, and those
    files' relative paths."""
    buffer = io.BytesIO()
    skipped = []
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(run_dir.rglob("*")):
            if not path.is_file() or path.name.endswith(".tmp"):
                continue
            relative = path.relative_to(run_dir).as_posix()
            if path.stat().st_size > max_file_mb * 2**20:
                skipped.append(relative)
                continue
            tar.add(path, arcname=relative)
    return buffer.getvalue(), skipped


def _main(argv: list[str]) -> int:
    run_dir = Path(argv[0]).expanduser()
    if not (run_dir / "manifest.json").is_file():
        print(f"explab pull: {run_dir} is not a run or sweep directory on this cluster", file=sys.stderr)
        return 1
    data, skipped = pack(run_dir)
    print(BEGIN)
    print(json.dumps({"path": str(run_dir.resolve()), "skipped": skipped}))
    text = base64.b64encode(data).decode()
    for i in range(0, len(text), 76):
        print(text[i:i + 76])
    print(END, flush=True)
    return 0


# ---- client side ----------------------------------------------------------------------------------
def printed_dir(logs: str) -> str | None:
    """The run or sweep directory a job's log names: the last line that is an absolute path inside
    a ``<job>/<id>`` or ``sweeps/<job>/<id>`` layout."""
    for line in reversed(logs.splitlines()):
        line = line.strip()
        if line.startswith("/") and " " not in line and len(Path(line).parts) >= 3:
            return line
    return None


def unpack(logs: str, dest: Path) -> tuple[Path, list[str]]:
    """Unpack what `_main` printed into ``dest`` (which must not exist); returns (dest, skipped)."""
    lines = logs.splitlines()
    try:
        start, stop = lines.index(BEGIN), lines.index(END)
    except ValueError:
        raise ExplabError("the packing job printed no archive: see its log with `explab logs`") from None
    header = json.loads(lines[start + 1])
    data = base64.b64decode("".join(lines[start + 2:stop]))
    dest.mkdir(parents=True, exist_ok=False)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")  # relative paths only: nothing lands outside dest
    return dest, list(header.get("skipped", []))


def pull(job_id: str, address: str | None = None, runs_dir: str | Path | None = None,
         timeout_s: float = PACK_TIMEOUT_S) -> tuple[Path, list[str]]:
    """Bring the run (or sweep) directory of finished job ``job_id`` into the local runs dir;
    returns (local directory, files left on the cluster)."""
    from explab import jobs_api
    from explab.runs import runs_root

    address = jobs_api.resolve_address(address)
    info = jobs_api.status(job_id, address)
    if info["status"] not in jobs_api.TERMINAL:
        raise ExplabError(f"job {job_id} is {info['status']}: pull it once it has ended "
                          f"(`explab logs {job_id} --follow`)")
    remote = printed_dir(jobs_api.logs(job_id, address))
    if remote is None:
        raise ExplabError(f"job {job_id} printed no run directory (it ended before its run began): "
                          f"see `explab logs {job_id}`")
    parts = Path(remote).parts
    layout = parts[-4:] if len(parts) >= 4 and parts[-4] == "sweeps" else parts[-2:]
    dest = runs_root(runs_dir).joinpath(*layout)
    if dest.exists():
        raise ExplabError(f"{dest} exists already: remove it first, or pull into another --runs-dir")
    client = jobs_api.client(address)
    explab_dir = Path(__file__).resolve().parent
    entrypoint = f"python -m explab.pull {jobs_api.shlex.quote(remote)}"
    packer = jobs_api._call(address, lambda: client.submit_job(
        entrypoint=entrypoint, submission_id=f"{job_id}-pull-{jobs_api.secrets.token_hex(2)}",
        runtime_env={"py_modules": [str(explab_dir)]}, metadata={"explab_pull": job_id}))
    state = jobs_api.wait(packer, address, timeout_s=timeout_s)
    logs = jobs_api.logs(packer, address)
    if state != "SUCCEEDED":
        last = [line for line in logs.splitlines() if line.strip()][-1:] or [state]
        raise ExplabError(f"packing {remote} on the cluster ended {state} ({last[0]}): see `explab logs {packer}`")
    return unpack(logs, dest)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
