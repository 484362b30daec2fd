"""Runs: every run folder under the roots' `work_dirs/`, read from what training writes (config.json, metrics.jsonl,
checkpoint-<step>/), and the `xtune train` processes the web UI starts, stops and resumes.

A run is the same `xtune train` a user could type, started as a process of its own session with its output in a
log file beside the run folders: closing the browser, or stopping the web UI, stops no run and loses nothing.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xtune.config.schema import Config
from xtune.engine.checkpoint import LOCK_FILE, TRAINING_STATE, complete_checkpoints, lock_holder, read_run_meta, step_of
from xtune.engine.train import DATA_FINGERPRINT, total_steps
from xtune.errors import XtuneError
from xtune.paths import xtune_home
from xtune.webui.files import Roots

JOBS = ".webui-jobs"
"""Inside a work folder: one JSON per `xtune train` the web UI started (command, process id, log file)."""

CURVES = ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s")


@dataclass
class Job:
    id: str
    command: list[str]
    """As a user would type it (`xtune train ...`)."""
    pid: int
    log: str
    work_dir: str
    started: float
    run: str | None = None
    """The run folder, once the process has made (or, resuming, locked) it."""


@dataclass
class RunSummary:
    id: str
    """The run folder relative to the first root: the id the API takes."""
    name: str
    status: str
    """running, finished, stopped (no process, not at its last step), or failed (a web UI job that ended in error)."""
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_s: float | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None
    memory_gib: float | None = None
    """Resident memory of the training process, while it runs."""
    checkpoints: list[str] = field(default_factory=list)
    log: str | None = None
    command: str | None = None
    resumable: bool = False


def shown_command(command: list[str]) -> str:
    return shlex.join(command)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written
            continue
    return records


def curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    return {name: [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))] for name in CURVES}


def evaluations(records: list[dict]) -> list[dict]:
    """The answers to evaluation_inputs at each evaluation: [{"step", "evaluation": [{"input", "output"}]}]."""
    return [{"step": r["step"], "evaluation": r["evaluation"]} for r in records if "evaluation" in r]


class Runs:
    """The runs under the roots, and the training processes this web UI started."""

    def __init__(self, roots: Roots, python: str = sys.executable):
        self.roots = roots
        self.python = python
        self.children: dict[int, subprocess.Popen] = {}
        """Processes started here, polled so that one that ended is not left a zombie (and not seen alive)."""

    # finding runs ------------------------------------------------------------------------------

    def run_dirs(self) -> list[Path]:
        """Folders with training's config.json and metrics.jsonl, up to three levels under each root's work_dirs/
        (`work_dirs/<config>/<timestamp>/`, as training names them), oldest first."""
        found = set()
        for root in self.roots.folders:
            for depth in ("*", "*/*", "*/*/*"):
                for metrics in (root / "work_dirs").glob(f"{depth}/metrics.jsonl"):
                    run = metrics.parent
                    if (run / "config.json").is_file() and not run.is_symlink() and not _hidden(run, root):
                        found.add(run)
        return sorted(found, key=lambda path: path.name)

    def work_dirs(self) -> list[Path]:
        """The folders runs are in, and those the web UI started runs in (which may have none yet)."""
        found = {run.parent for run in self.run_dirs()}
        for root in self.roots.folders:
            for depth in ("", "*/", "*/*/"):
                found |= {jobs.parent for jobs in (root / "work_dirs").glob(f"{depth}{JOBS}")}
        return sorted(found)

    def run_dir(self, run_id: str) -> Path:
        path = self.roots.inside(run_id)
        if not (path / "config.json").is_file():
            raise XtuneError(f"{run_id}: not a run folder (no config.json).")
        return path

    def jobs(self) -> list[Job]:
        jobs = []
        for work_dir in self.work_dirs():
            for path in sorted((work_dir / JOBS).glob("*.json")):
                try:
                    job = Job(**json.loads(path.read_text()))
                except (OSError, ValueError, TypeError):  # not a job file this web UI wrote whole
                    continue
                if job.run is None:
                    job.run = self._find_run(job)
                    if job.run is not None:
                        _write_job(path, job)
                jobs.append(job)
        return jobs

    def _find_run(self, job: Job) -> str | None:
        for run_dir in Path(job.work_dir).glob("*/config.json"):
            if _lock_pid(run_dir.parent) == job.pid:
                return self.roots.shown(run_dir.parent)
        return None

    # state -------------------------------------------------------------------------------------

    def alive(self, pid: int | None) -> bool:
        if pid is None:
            return False
        child = self.children.get(pid)
        if child is not None and child.poll() is not None:
            return False
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            try:
                os.kill(pid, 0)
            except OSError:
                return False
            return True
        return state not in ("Z", "X")

    def summary(self, run_dir: Path, jobs: list[Job] | None = None) -> RunSummary:
        jobs = self.jobs() if jobs is None else jobs
        run_id = self.roots.shown(run_dir)
        job = next((j for j in reversed(jobs) if j.run == run_id), None)
        records = read_metrics(run_dir)
        steps = [r for r in records if "loss" in r]
        last = steps[-1] if steps else {}
        config = _config_of(run_dir)
        total = _total_steps(config, job, run_dir)
        holder = lock_holder(run_dir)
        running = holder is not None
        checkpoints = complete_checkpoints(run_dir)
        finished = total is not None and any(step_of(c) >= total for c in checkpoints)
        finished = finished or (job is not None and not self.alive(job.pid) and _log_says_done(job.log))
        status = "running" if running else "finished" if finished else "stopped"
        step = last.get("step", 0)
        eta = None
        if running and total and step and last.get("elapsed_s"):
            eta = max(total - step, 0) * last["elapsed_s"] / step
        evals = [r["eval_loss"] for r in records if "eval_loss" in r]
        return RunSummary(
            id=run_id, name=f"{run_dir.parent.name}/{run_dir.name}", status=status, step=step, total_steps=total,
            loss=last.get("loss"), eval_loss=evals[-1] if evals else None, tokens_per_s=last.get("tokens_per_s"),
            elapsed_s=last.get("elapsed_s"), eta_s=eta, memory_gib=_rss_gib(holder[0]) if running and _here(holder) else None,
            checkpoints=[self.roots.shown(c) for c in checkpoints], log=job.log if job else None,
            command=shown_command(job.command) if job else None,
            resumable=not running and not finished and any((c / TRAINING_STATE).is_file() for c in checkpoints),
        )  # fmt: skip

    def summaries(self) -> dict:
        """Every run, newest first, and the web UI's jobs that have no run folder (yet, or ever: a failed start)."""
        jobs = self.jobs()
        runs = [asdict(self.summary(run_dir, jobs)) for run_dir in reversed(self.run_dirs())]
        pending = [{**asdict(job), "status": "starting" if self.alive(job.pid) else "failed",
                    "command": shown_command(job.command), "log_tail": _tail(job.log)}
                   for job in jobs if job.run is None]  # fmt: skip
        return {"runs": runs, "jobs": pending}

    def detail(self, run_id: str) -> dict:
        run_dir = self.run_dir(run_id)
        records = read_metrics(run_dir)
        summary = self.summary(run_dir)
        return {**asdict(summary), "curves": curves(records), "evaluations": evaluations(records),
                "log_tail": _tail(summary.log) if summary.log else None,
                "meta": read_run_meta(complete_checkpoints(run_dir)[-1]) if complete_checkpoints(run_dir) else {}}  # fmt: skip

    # processes ---------------------------------------------------------------------------------

    def train_command(self, config: str, resume: str | None = None, allow_code: bool = False) -> list[str]:
        command = ["xtune", "train", config]
        if resume is not None:
            command += ["--resume", resume]
        if allow_code:
            command.append("--allow-code")
        return command

    def start(self, config_path: Path, work_dir: Path, resume: Path | None = None, allow_code: bool = False) -> Job:
        """`xtune train CONFIG` in its own session, its output in a log file in `work_dir/.webui-jobs/`."""
        config_path, work_dir = self.roots.inside(config_path), self.roots.inside(work_dir)
        shown = self.train_command(self.roots.shown(config_path), self.roots.shown(resume) if resume else None,
                                   allow_code)  # fmt: skip
        stamp = time.strftime("%Y%m%d_%H%M%S") + f"_{time.time_ns() % 1_000_000:06d}"
        folder = work_dir / JOBS
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / f"{stamp}.log"
        with log.open("ab") as out:
            out.write(f"$ {shown_command(shown)}\n".encode())
            out.flush()
            process = subprocess.Popen(
                [self.python, "-m", "xtune.cli", *shown[1:]], cwd=self.roots.main, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        self.children[process.pid] = process
        job = Job(stamp, shown, process.pid, str(log), str(work_dir), time.time(),
                  self.roots.shown(resume.parent) if resume else None)  # fmt: skip
        _write_job(folder / f"{stamp}.json", job)
        return job

    def resume(self, run_id: str) -> Job:
        """Continue a stopped run from its newest complete checkpoint, with the resolved config it started with."""
        run_dir = self.run_dir(run_id)
        if lock_holder(run_dir) is not None:
            raise XtuneError(f"{run_id} is running.")
        resumable = [c for c in complete_checkpoints(run_dir) if (c / TRAINING_STATE).is_file()]
        if not resumable:
            raise XtuneError(f"{run_id}: no complete checkpoint to resume from.")
        return self.start(run_dir / "config.json", run_dir.parent, resume=resumable[-1])

    def stop(self, run_id: str) -> int:
        """Interrupt the run's training process (Ctrl-C: its checkpoints so far stay, and it resumes from them): the
        process that holds the run's lock now, on this machine; never one a lock file left behind merely names."""
        run_dir = self.run_dir(run_id)
        holder = lock_holder(run_dir)
        if holder is None:
            raise XtuneError(f"{run_id} is not running (no process holds its {LOCK_FILE}).")
        pid, node = holder
        if not _here(holder):
            raise XtuneError(f"{run_id} is trained on {node} (pid {pid}), not on this machine; stop it there.")
        if not self.alive(pid) or b"xtune" not in _cmdline(pid):
            raise XtuneError(f"{run_id}: its lock names pid {pid}, which is not an xtune process; not stopping it.")
        os.killpg(os.getpgid(pid), signal.SIGINT)
        return pid


def _write_job(path: Path, job: Job) -> None:
    """Whole or not at all: another request may be reading the folder."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.{time.time_ns()}.partial")
    partial.write_text(json.dumps(asdict(job)))
    os.replace(partial, path)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _here(holder: tuple[int, str]) -> bool:
    return holder[1] == os.uname().nodename


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _lock_pid(run_dir: Path) -> int | None:
    """The pid a run's lock file names, held or not: which web UI job made the run (never whom to signal)."""
    try:
        match = re.match(r"pid (\d+)", (run_dir / LOCK_FILE).read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _config_of(run_dir: Path) -> Config | None:
    """The run's resolved config, as read (not validated again: it was, when the run started)."""
    try:
        return Config.model_construct(**json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _total_steps(config: Config | None, job: Job | None, run_dir: Path) -> int | None:
    """max_steps, or the count training computes from its samples: those its log reports, or those of the data
    cache entry the run names (data.json), over the processes its checkpoints record."""
    if config is None:
        return None
    if config.max_steps is not None:
        return config.max_steps
    text = Path(job.log).read_text(errors="replace") if job and Path(job.log).is_file() else ""
    if match := re.search(r"^data: ([\d,]+) samples", text, re.MULTILINE):
        return total_steps(config, int(match.group(1).replace(",", "")))
    try:
        entry = json.loads((run_dir / DATA_FINGERPRINT).read_text())["data"]
        samples = json.loads((xtune_home() / "data-cache" / entry / "report.json").read_text())["samples"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    checkpoints = complete_checkpoints(run_dir)
    world = _progress(checkpoints[-1]).get("world", 1) if checkpoints else 1
    return total_steps(config, samples, world)


def _progress(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / "training_state.json").read_text()).get("progress", {})
    except (OSError, ValueError):
        return {}


def _log_says_done(log: str) -> bool:
    try:
        return "\ncheckpoint: " in Path(log).read_text(errors="replace")
    except OSError:
        return False


def _tail(log: str | None, lines: int = 40) -> str:
    try:
        return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:]) if log else ""
    except OSError:
        return ""


def _rss_gib(pid: int | None) -> float | None:
    try:
        match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) / 2**20 if match else None


def plot_svg(series: dict[str, list[tuple[int, float]]], metric: str) -> bytes:
    """One metric of several runs on one plot (matplotlib, as training's loss.png), as SVG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6.4, 3.2))
    for name, points in series.items():
        if points:
            axes.plot([s for s, _ in points], [v for _, v in points], linewidth=1.2, label=name,
                      marker="o" if metric == "eval_loss" or len(points) < 3 else None, markersize=3)  # fmt: skip
    if len(series) > 1 and any(series.values()):
        axes.legend(fontsize=7)
    axes.set(xlabel="optimizer step", ylabel=metric)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="svg")
    pyplot.close(figure)
    return out.getvalue()
