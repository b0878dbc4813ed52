import logging

import pytest
from mlflow import MlflowClient

from proxytune.core.tracking import (
    KFP_RUN_TAG,
    PARENT_TAG,
    Tracker,
    TrackingContext,
    flatten,
    redact,
    stage_run,
)


def test_stages_of_one_pipeline_run_share_a_parent(sqlite_tracking):
    context = TrackingContext(experiment="unit", kfp_run_id="run-1", kfp_run_name="proxy-tuning-run-1")
    with stage_run(context, "ingest") as first:
        first.log_params({"a": {"b": 1}})
    with stage_run(context, "register", closes_pipeline=True) as second:
        second.log_metric("x", 0.5)
    assert first.parent_run_id == second.parent_run_id
    client = MlflowClient(sqlite_tracking)
    parent = client.get_run(first.parent_run_id)
    assert parent.data.tags[KFP_RUN_TAG] == "run-1" and parent.info.run_name == "proxy-tuning-run-1"
    assert parent.info.status == "FINISHED"
    child = client.get_run(first.run_id)
    assert child.data.tags[PARENT_TAG] == parent.info.run_id
    assert child.data.params == {"a.b": "1"}
    assert child.info.status == "FINISHED"
    assert client.get_run(second.run_id).data.metrics == {"x": 0.5}

    with stage_run(TrackingContext(experiment="unit", kfp_run_id="run-2"), "ingest") as other:
        pass
    assert other.parent_run_id != first.parent_run_id


def test_a_failing_stage_fails_its_run_and_the_pipeline_run(sqlite_tracking):
    context = TrackingContext(experiment="unit", kfp_run_id="run-fail")
    with pytest.raises(RuntimeError, match="out of memory"), stage_run(context, "tune_student") as tracker:
        tracker.log_metric("train_loss", 1.0, 0)
        raise RuntimeError("out of memory")
    client = MlflowClient(sqlite_tracking)
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    assert client.get_run(tracker.parent_run_id).info.status == "FAILED"
    assert [m.value for m in client.get_metric_history(tracker.run_id, "train_loss")] == [1.0]


def test_step_metrics_are_sent_in_batches_and_all_arrive(sqlite_tracking):
    with stage_run(TrackingContext(experiment="unit", kfp_run_id="run-3"), "tune_supervisor") as tracker:
        for step in range(250):
            tracker.log_metric("train_loss", 1.0 / (step + 1), step)
        assert len(tracker._metrics) == 50  # two batches of 100 already sent
    history = MlflowClient(sqlite_tracking).get_metric_history(tracker.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(250))


def test_without_a_tracking_uri_stages_log_nowhere(monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with caplog.at_level(logging.WARNING), stage_run(TrackingContext(), "ingest") as tracker:
        tracker.log_metric("x", 1.0)
    assert type(tracker) is Tracker and tracker.run_id is None
    assert "ingest is not tracked" in caplog.text


def test_sqlite_experiments_keep_artifacts_beside_the_database(sqlite_tracking, tmp_path):
    with stage_run(TrackingContext(experiment="files", kfp_run_id="r"), "evaluate") as tracker:
        (tmp_path / "report.html").write_text("<html></html>")
        tracker.log_artifact(tmp_path / "report.html")
    experiment = MlflowClient(sqlite_tracking).get_experiment_by_name("files")
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert list((tmp_path / "mlartifacts").rglob("report.html"))


def test_helpers():
    assert flatten({"a": {"b": {"c": 1}}, "d": 2}) == {"a.b.c": 1, "d": 2}
    assert redact("https://user:pw@mlflow.example:5000/x") == "https://mlflow.example:5000/x"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
