"""`proxytune run` as users run it, in real subprocesses on one workdir: a second run refused
while the first holds it, SIGTERM and SIGINT stopping everything within seconds, a hard kill
cleaned up by the next run, re-runs reusing finished work, and a terminal view a person reads.

The tests run in order on one workdir, each starting from what the previous one left."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.pipeline
QUICK = [
    "--set=supervisor.steps=4",
    "--set=proxy.num_images=40",
    "--set=proxy.batch_size=1",
    "--set=student.steps=4",
    "--set=evaluation.num_prompts=1",
    "--set=evaluation.images_per_prompt=1",
    "--set=evaluation.variance_samples=0",
    "--set=evaluation.supervisor_inference_steps=2",
]
PROXYTUNE = [sys.executable, "-m", "proxytune.cli"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("local-run") / "work"


@pytest.fixture(scope="module")
def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PROXYTUNE_"))}
    return {**env, "COLUMNS": "120"}


def start(workdir: Path, environment: dict[str, str], *extra: str) -> subprocess.Popen:
    """`proxytune run` as a user starts it: SIGINT handled (a background job, as CI runs the
    tests, inherits SIGINT ignored; a terminal's foreground process does not)."""
    return subprocess.Popen(
        [*PROXYTUNE, "run", "--workdir", str(workdir), *QUICK, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def latest_log(workdir: Path, after: int = 0) -> str:
    """The pipeline log of the newest run, if more than `after` runs have started."""
    logs = sorted(workdir.glob("runs/*/logs/pipeline.log"))
    return logs[-1].read_text() if len(logs) > after else ""


def runs(workdir: Path) -> int:
    return len(list(workdir.glob("runs/*")))


def proxy_images(workdir: Path) -> dict[str, tuple[str, int]]:
    """Every proxy image in the local store: its sha256 and modification time."""
    return {
        str(p.relative_to(workdir)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in (workdir / "store").glob("proxy/**/*.png")
    }


def processes_under(folder: Path) -> list[str]:
    """Command lines of live processes that mention `folder` (the run's child and its steps)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(folder) in text:
            found.append(text)
    return found


def mlflow_statuses(workdir: Path) -> list[str]:
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [run.info.status for run in client.search_runs(experiments)]


def test_sigterm_stops_the_run_and_its_steps_and_a_second_run_is_refused_meanwhile(workdir, environment):
    first = start(workdir, environment)
    wait_for(lambda: "Executing task" in latest_log(workdir), 120, "the first step")
    began = time.monotonic()
    second = subprocess.run(
        [*PROXYTUNE, "run", "--workdir", str(workdir), *QUICK],
        capture_output=True,
        text=True,
        env=environment,
    )
    assert second.returncode == 2 and time.monotonic() - began < 10
    assert f"is in use by another proxytune run (pid {first.pid})" in second.stdout
    assert "Traceback" not in second.stdout + second.stderr

    wait_for(lambda: "Executing task 'generate-proxy'" in latest_log(workdir), 240, "proxy generation")
    wait_for(lambda: len(proxy_images(workdir)) >= 2, 120, "two proxy images")
    first.send_signal(signal.SIGTERM)
    began = time.monotonic()
    out, _ = first.communicate(timeout=30)
    assert first.returncode == 130 and time.monotonic() - began < 10, out
    assert "interrupted during generate-proxy" in out and "Traceback" not in out
    (run_dir,) = workdir.glob("runs/*")
    assert not processes_under(run_dir), "a step was left running"
    assert not (run_dir / "tmp").exists() and not (workdir / ".lock").exists()
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_step"] == "generate-proxy"
    assert "RUNNING" not in mlflow_statuses(workdir) and "KILLED" in mlflow_statuses(workdir)
    (workdir / "proxy-images.json").write_text(json.dumps(proxy_images(workdir)))


def test_the_rerun_reuses_the_supervisor_and_every_proxy_image_drawn(workdir, environment):
    before = json.loads((workdir / "proxy-images.json").read_text())
    run = start(workdir, environment)
    wait_for(lambda: (workdir / ".lock").exists(), 60, "the run to take the workdir")
    second = subprocess.run(
        [*PROXYTUNE, "run", "--workdir", str(workdir), *QUICK],
        capture_output=True,
        text=True,
        env=environment,
    )
    assert second.returncode == 2 and "is in use by another proxytune run" in second.stdout
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out  # the first finishes intact
    assert re.search(r"↺ tune-supervisor\s+reused", out)
    after = proxy_images(workdir)
    assert {k: list(v) for k, v in after.items() if k in before} == before  # untouched: same bytes, mtime
    assert len(after) >= 40 > len(before)
    lines = out.splitlines()
    assert len(lines) < 40 and "Traceback" not in out
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "succeeded" and Path(summary["student_adapter"]).is_dir()
    for path in (summary["report"], summary["student_adapter"], str(workdir / "summary.json")):
        assert path in out
    assert "Random-weight models" in summary["note"] and "note: Random-weight models" in out
    assert (Path(summary["workdir"]) / "runs" / summary["run_id"] / "summary.json").exists()


def test_an_identical_run_reuses_every_step_in_a_fraction_of_the_time(workdir, environment):
    previous = json.loads((workdir / "summary.json").read_text())
    run = start(workdir, environment)
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out
    steps = re.findall(r"^\s+(\S) (\S+)\s+(reused|[\d.]+ s)$", out, re.MULTILINE)
    assert {name for mark, name, took in steps if took != "reused"} == {"register"}, out
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["seconds"] < previous["seconds"] / 2
    assert runs(workdir) == 3  # each run keeps its own summary


def test_sigint_then_a_hard_kill_are_cleaned_up_by_the_next_run(workdir, environment):
    changed = "--set=student.steps=6"  # the student and what follows run again
    before = runs(workdir)
    interrupted = start(workdir, environment, changed)
    wait_for(lambda: "Executing task 'tune-student'" in latest_log(workdir, before), 240, "student tuning")
    interrupted.send_signal(signal.SIGINT)
    out, _ = interrupted.communicate(timeout=30)
    assert interrupted.returncode == 130 and re.search(
        r"interrupted during (tune-student|tune-direct|evaluate)", out
    )

    changed = "--set=student.steps=7"  # what the interrupted run finished is reused: change it again
    before = runs(workdir)
    killed = start(workdir, environment, changed)
    wait_for(lambda: "Executing task 'tune-student'" in latest_log(workdir, before), 240, "student tuning")
    wait_for(lambda: "RUNNING" in mlflow_statuses(workdir), 120, "the step's MLflow run")
    killed.kill()  # no chance to clean up: the child follows (it dies with its parent)
    killed.wait()
    wait_for(lambda: not processes_under(workdir / "runs"), 20, "the orphaned steps to die")
    assert (workdir / ".lock").exists() and "RUNNING" in mlflow_statuses(workdir)

    after = start(workdir, environment, changed)
    out, _ = after.communicate(timeout=600)
    assert after.returncode == 0, out
    assert re.search(r"marked \d+ MLflow run\(s\) of an earlier, killed run on this workdir KILLED", out)
    assert "RUNNING" not in mlflow_statuses(workdir)


def test_a_failed_step_is_named_with_its_cause_and_log(workdir, environment):
    missing = workdir.parent / "no-such-supervisor"
    run = start(workdir, environment, f"--set=supervisor.model_source={missing}")
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 1, out
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_step"] == "tune-supervisor"
    assert str(missing) in summary["cause"] and "\x1b" not in summary["cause"]
    assert f"✗ {summary['failed_step']} failed: {summary['cause']}" in out.replace("\n", " ")
    assert f"log:     {summary['log']}" in out and Path(summary["log"]).name.startswith(
        summary["failed_step"]
    )
    assert "Traceback" not in out and "RUNNING" not in mlflow_statuses(workdir)
