"""The supervised local run's parts: the workdir lock, the routing of kfp.local's output into
per-step logs and a one-line-per-step view, and a failed step's cause."""

import io
import os
import subprocess
import sys

import pytest
from rich.console import Console

from proxytune.ops.runner import StepView, WorkdirBusy, failure_cause, workdir_lock

# kfp.local's own lines (colour codes and all), as a run prints them
OUTPUT = """\
07:11:29.205 - INFO - Running pipeline: \x1b[95m'proxy-tuning'\x1b[0m
07:11:29.207 - INFO - Executing task \x1b[96m'plan'\x1b[0m
07:11:29.207 - INFO - Streamed logs:
    planning the run
07:11:29.572 - INFO - Task \x1b[96m'plan'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m
07:11:29.600 - INFO - Task ingest cache hit (key=0123456789ab); skipping execution.
07:11:29.573 - INFO - Executing task \x1b[96m'register'\x1b[0m
    Traceback (most recent call last):
      File "x.py", line 8, in register
    mlflow.exceptions.MlflowException: Invalid name 'bad/name'
07:11:29.903 - ERROR - Task \x1b[96m'register'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m
"""


def test_a_second_holder_of_a_workdir_is_refused_naming_the_first(tmp_path):
    with workdir_lock(tmp_path):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
        busy = rf"in use by another proxytune run \(pid {os.getpid()}\)"
        with pytest.raises(WorkdirBusy, match=busy), workdir_lock(tmp_path):
            pass
    assert not (tmp_path / ".lock").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (tmp_path / ".lock").write_text(gone.stdout)
    with workdir_lock(tmp_path):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"


def test_output_goes_to_one_log_per_step_and_one_line_per_step_to_the_terminal(tmp_path):
    out = io.StringIO()
    view = StepView(tmp_path, Console(file=out, width=100), verbose=False)
    for line in OUTPUT.splitlines(keepends=True):
        view.feed(line)
    view.close()
    assert [(s.name, s.state) for s in view.steps] == [
        ("plan", "done"),
        ("ingest", "reused"),
        ("register", "failed"),
    ]
    assert view.failed.name == "register"
    assert (
        tmp_path / "plan.log"
    ).read_text() == "07:11:29.207 - INFO - Streamed logs:\n    planning the run\n"
    assert "\x1b" not in (tmp_path / "pipeline.log").read_text()
    assert (tmp_path / "pipeline.log").read_text().count("\n") == len(OUTPUT.splitlines())
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("  ✓ plan") and lines[0].endswith(" s")
    assert lines[1].split() == ["↺", "ingest", "reused"] and lines[2].startswith("  ✗ register")
    assert (
        failure_cause(tmp_path / "register.log")
        == "mlflow.exceptions.MlflowException: Invalid name 'bad/name'"
    )


def test_verbose_streams_every_line_and_repeated_steps_get_their_own_logs(tmp_path):
    out = io.StringIO()
    view = StepView(tmp_path, Console(file=out, width=200), verbose=True)
    for shard in range(2):
        view.feed("1 - INFO - Executing task 'generate-proxy'\n")
        view.feed(f"    shard {shard}\n")
        view.feed("1 - INFO - Task 'generate-proxy' finished with status SUCCESS\n")
    view.close()
    assert (tmp_path / "generate-proxy.log").read_text() == "    shard 0\n"
    assert (tmp_path / "generate-proxy-2.log").read_text() == "    shard 1\n"
    assert out.getvalue().count("\n") == 6 and "    shard 1" in out.getvalue()


def test_servers_that_do_not_answer_are_refused_in_one_line_without_credentials(monkeypatch):
    import http.server
    import threading

    from proxytune.ops.runner import check_servers
    from tests.conftest import free_port

    monkeypatch.delenv("PROXYTUNE_S3_ENDPOINT_URL", raising=False)
    dead = free_port()
    with pytest.raises(ValueError, match=rf"^MLflow at http://127.0.0.1:{dead} cannot be reached") as refused:
        check_servers(f"http://user:secret@127.0.0.1:{dead}", timeout_s=2)
    assert "secret" not in str(refused.value)
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("PROXYTUNE_S3_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
        with pytest.raises(ValueError, match=r"^S3 at"):
            check_servers(f"http://127.0.0.1:{server.server_port}", timeout_s=2)
        monkeypatch.setenv("PROXYTUNE_S3_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")
        check_servers(f"http://127.0.0.1:{server.server_port}", timeout_s=2)
        check_servers("sqlite:///nowhere/mlflow.db")  # a file, nothing to reach
    finally:
        server.shutdown()
