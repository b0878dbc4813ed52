"""`proxytune run` on this machine, supervised: one run per workdir, a readable terminal view,
every step's log on disk, clean interrupts.

The CLI (the parent) validates the inputs, takes the workdir's lock, and runs the pipeline
(`proxytune.ops.local.run_local`) in a child process in its own session. It reads the child's
output: every line goes to `<run dir>/logs/pipeline.log` and to the log of the step it came
from (`<run dir>/logs/<step>.log`); the terminal shows one line per step with its state and
duration (and, on a terminal, the running step's latest progress line); `verbose` streams
everything instead. A run's files live in `<workdir>/runs/<run id>/`; its `summary.json` and
`report.html` are also copied to the top of the workdir.

- One run per workdir: `<workdir>/.lock` holds the running parent's pid; a second run refuses
  at once, naming it; a lock whose process is gone (a hard kill) is taken over.
- Ctrl-C or SIGTERM (what Kubernetes sends) stops the child's whole process group (the pipeline
  and the step running under it) within seconds, marks the run's MLflow runs KILLED and says
  what the next run reuses. At start, MLflow runs that an earlier, hard-killed run on this
  workdir left RUNNING are marked KILLED (the lock proves nothing else is running here).
- The child's temporary files (kfp.local's per-step folders among them) go to the run's own
  `tmp/`, removed when the run ends, however it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from proxytune.core.fsutil import atomic_write_json, read_json
from proxytune.core.tracking import LOCAL_RUN_ENV, LOCAL_RUN_TAG, WORKDIR_ENV, WORKDIR_TAG

LOCK_FILE = ".lock"
REQUEST_FILE = "request.json"
SUMMARY_FILE = "summary.json"
STOP_GRACE_S = 5.0  # SIGTERM to the child's group, then SIGKILL after this
ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXECUTING = re.compile(r" - INFO - Executing task '(?P<task>[^']+)'")
FINISHED = re.compile(r" - (?:INFO|ERROR) - Task '(?P<task>[^']+)' finished with status (?P<status>\w+)")
CACHED = re.compile(r"Task (?P<task>[\w.-]+) cache hit")
ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b.*")
MARKS = {"done": "[green]✓[/green]", "reused": "[cyan]↺[/cyan]", "failed": "[red]✗[/red]"}


class WorkdirBusy(ValueError):
    """Another run holds the workdir."""


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold `<workdir>/.lock` (this process's pid) for the block; refuse a workdir in use."""
    path = workdir / LOCK_FILE
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = _lock_owner(path)
            if owner is not None:
                raise WorkdirBusy(
                    f"{workdir} is in use by another proxytune run (pid {owner}); "
                    "wait for it to finish or give another --workdir"
                ) from None
            path.unlink(missing_ok=True)  # stale: its process is gone
    else:
        raise WorkdirBusy(f"{workdir}: could not take {path}")
    with os.fdopen(fd, "w") as lock:
        lock.write(f"{os.getpid()}\n")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _lock_owner(path: Path) -> int | None:
    """The pid in a lock file if that process is alive, else None (a stale lock)."""
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def new_run_dir(workdir: Path) -> tuple[str, Path]:
    """A fresh `<workdir>/runs/<run id>/` (UTC time, then random: sortable and unique)."""
    run_id = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
    run_dir = workdir / "runs" / run_id
    (run_dir / "logs").mkdir(parents=True)
    return run_id, run_dir


@dataclass
class Step:
    name: str
    log: Path
    started: float = field(default_factory=time.monotonic)
    state: str = "running"
    seconds: float = 0.0


class StepView:
    """Routes the pipeline's output lines to the logs and shows one line per finished step."""

    def __init__(self, logs: Path, console: Console, verbose: bool):
        self.logs, self.console, self.verbose = logs, console, verbose
        self.pipeline_log = (logs / "pipeline.log").open("a")
        self.steps: list[Step] = []
        self.current: Step | None = None
        self.current_log = None
        self.status = None if verbose or not console.is_terminal else console.status("starting")
        if self.status:
            self.status.start()

    def feed(self, raw: str) -> None:
        """One line of output (its progress-bar redraws, `\\r`-separated, already collapsed)."""
        line = ANSI.sub("", raw).rstrip("\n")
        self.pipeline_log.write(line + "\n")
        if self.verbose:
            self.console.print(escape(line), highlight=False)
        if match := EXECUTING.search(line):
            self._start(match["task"])
        elif match := FINISHED.search(line):
            self._finish("done" if match["status"] == "SUCCESS" else "failed")
        elif match := CACHED.search(line):
            self._show(Step(match["task"], self._log_path(match["task"]), state="reused"))
        elif self.current_log:
            self.current_log.write(line + "\n")

    def progress(self, text: str) -> None:
        """The running step's latest progress-bar state (a terminal shows it beside the spinner)."""
        if self.status and self.current:
            self.status.update(f"{self.current.name}: {escape(ANSI.sub('', text).strip()[:100])}")

    def close(self) -> None:
        if self.status:
            self.status.stop()
        if self.current_log:
            self.current_log.close()
        self.pipeline_log.close()

    @property
    def failed(self) -> Step | None:
        return next((s for s in self.steps if s.state == "failed"), None)

    def _start(self, task: str) -> None:
        self.current = Step(task, self._log_path(task))
        self.current_log = self.current.log.open("w")
        if self.status:
            self.status.update(f"{task} …")

    def _finish(self, state: str) -> None:
        if self.current is None:
            return
        self.current_log.close()
        self.current_log = None
        self.current.state, self.current.seconds = state, time.monotonic() - self.current.started
        self._show(self.current)
        self.current = None

    def _show(self, step: Step) -> None:
        self.steps.append(step)
        if self.verbose:
            return
        took = "reused" if step.state == "reused" else f"{step.seconds:6.1f} s"
        self.console.print(f"  {MARKS[step.state]} {step.name:<28} {took}", highlight=False)

    def _log_path(self, task: str) -> Path:
        taken = sum(s.name == task for s in self.steps) + (
            self.current is not None and self.current.name == task
        )
        return self.logs / (f"{task}.log" if not taken else f"{task}-{taken + 1}.log")


def failure_cause(log: Path) -> str:
    """A failed step's cause in plain text: the last exception line of its log."""
    lines = [line.strip() for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    errors = [line for line in lines if ERROR_LINE.match(line)]
    return (errors or lines or ["no output"])[-1]


def mark_killed(tracking_uri: str, tag: str, value: str) -> int:
    """Mark every RUNNING MLflow run tagged `tag`=`value` KILLED; returns how many."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return 0
    running = client.search_runs(
        experiments, filter_string=f"tags.`{tag}` = '{value}' and status = 'RUNNING'"
    )
    for run in running:
        client.set_terminated(run.info.run_id, "KILLED")
    return len(running)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (Kubernetes, `kill`) handled like Ctrl-C."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(child: subprocess.Popen) -> None:
    """Stop the child's whole process group: SIGTERM, then SIGKILL after STOP_GRACE_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, sig)
        try:
            child.wait(timeout=STOP_GRACE_S)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)  # steps the pipeline left behind
            return
        except subprocess.TimeoutExpired:
            continue


def _read(child: subprocess.Popen, view: StepView) -> None:
    """Feed the child's output to `view` line by line, progress-bar redraws as they come."""
    pending = b""
    while chunk := os.read(child.stdout.fileno(), 65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            view.feed(line.decode(errors="replace").rsplit("\r", 1)[-1] + "\n")
        if b"\r" in pending:
            view.progress(pending.decode(errors="replace").rstrip("\r").rsplit("\r", 1)[-1])
    if pending:
        view.feed(pending.decode(errors="replace").rsplit("\r", 1)[-1])


def run_supervised(
    request: dict[str, Any], workdir: Path, tracking_uri: str, console: Console, verbose: bool = False
) -> tuple[str, dict[str, Any]]:
    """Run `request` (`run_local`'s arguments) in a child process on `workdir`; returns the
    outcome (succeeded, failed, interrupted) and the summary, also written to
    `<workdir>/summary.json` and the run's folder."""
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lock(workdir):
        stale = mark_killed(tracking_uri, WORKDIR_TAG, str(workdir)) if _tracked(tracking_uri) else 0
        if stale:
            console.print(f"marked {stale} MLflow run(s) of an earlier, killed run on this workdir KILLED")
        run_id, run_dir = new_run_dir(workdir)
        atomic_write_json(run_dir / REQUEST_FILE, {**request, "run_dir": str(run_dir)})
        tmp = run_dir / "tmp"
        tmp.mkdir()
        env = {**os.environ, "TMPDIR": str(tmp), LOCAL_RUN_ENV: run_id, WORKDIR_ENV: str(workdir)}
        console.print(f"run {run_id}: logs in {run_dir / 'logs'}", highlight=False)
        view = StepView(run_dir / "logs", console, verbose)
        started = time.monotonic()
        child = subprocess.Popen(
            [sys.executable, "-m", "proxytune.ops.runner", str(run_dir / REQUEST_FILE)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            preexec_fn=_die_with_parent,
        )
        try:
            with _sigterm_as_interrupt():
                _read(child, view)
                child.wait()
        except KeyboardInterrupt:
            _stop(child)
            killed = mark_killed(tracking_uri, LOCAL_RUN_TAG, run_id) if _tracked(tracking_uri) else 0
            summary = {
                "status": "interrupted",
                "run_id": run_id,
                "workdir": str(workdir),
                "seconds": round(time.monotonic() - started, 1),
                "finished_steps": [s.name for s in view.steps if s.state in ("done", "reused")],
                "interrupted_step": view.current.name if view.current else None,
                "mlflow_runs_killed": killed,
            }
            return "interrupted", _publish(summary, run_dir, workdir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            view.close()
        summary = read_json(run_dir / SUMMARY_FILE) if (run_dir / SUMMARY_FILE).exists() else {}
        summary.update(run_id=run_id, workdir=str(workdir))
        if child.returncode == 0 and summary.get("status") == "succeeded":
            return "succeeded", _publish(summary, run_dir, workdir)
        step = view.failed
        summary.update(
            status="failed",
            failed_step=step.name if step else None,
            cause=failure_cause(step.log if step else run_dir / "logs" / "pipeline.log"),
            log=str(step.log if step else run_dir / "logs" / "pipeline.log"),
        )
        summary.pop("error", None)
        return "failed", _publish(summary, run_dir, workdir)


def check_servers(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """MLflow (an http(s) tracking URI) and the S3 endpoint (`PROXYTUNE_S3_ENDPOINT_URL`), if
    used, answer at all (any HTTP status will do); else ValueError naming the server, before the
    run starts rather than after a step's retries."""
    from proxytune.core.storage import ENDPOINT_ENV
    from proxytune.core.tracking import redact

    servers = {"MLflow": tracking_uri, "S3": os.environ.get(ENDPOINT_ENV, "")}
    for name, url in servers.items():
        if not url.startswith(("http://", "https://")):
            continue
        try:
            urllib.request.urlopen(redact(url), timeout=timeout_s).close()  # credentials stay out
        except urllib.error.HTTPError:
            continue  # it answered
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ValueError(f"{name} at {redact(url)} cannot be reached ({reason})") from None


def _tracked(tracking_uri: str) -> bool:
    """Whether MLflow can be asked (a local SQLite file not made yet has no runs to mark)."""
    return not tracking_uri.startswith("sqlite:///") or Path(tracking_uri.removeprefix("sqlite:///")).exists()


def _publish(summary: dict[str, Any], run_dir: Path, workdir: Path) -> dict[str, Any]:
    """The run's summary into its folder, then it and the report (if any) to the workdir's top."""
    atomic_write_json(run_dir / SUMMARY_FILE, summary)
    shutil.copyfile(run_dir / SUMMARY_FILE, workdir / SUMMARY_FILE)
    if (run_dir / "report.html").exists():
        shutil.copyfile(run_dir / "report.html", workdir / "report.html")
    return summary


def _die_with_parent() -> None:
    """In the child before it starts: SIGTERM when the parent dies, even by SIGKILL (Linux)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _child(request_file: str) -> int:
    """The child: the pipeline through kfp.local, its summary in the run's folder. SIGTERM
    takes its whole process group (the step running under it) down with it."""
    import logging

    from proxytune.ops.local import run_local

    signal.signal(signal.SIGTERM, lambda signum, frame: os.killpg(0, signal.SIGKILL))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(levelname)s - %(message)s", force=True)
    request = json.loads(Path(request_file).read_text())
    try:
        run_local(**request)
    except RuntimeError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
