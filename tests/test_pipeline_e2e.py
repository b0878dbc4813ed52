"""The whole pipeline through kfp.local, tracked by a real MLflow server whose artifacts
live on a real S3-protocol server, which is also the platform's object store."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from proxytune.cli import main
from proxytune.core.tracking import KFP_RUN_TAG, ROLE_TAG, STAGE_TAG
from tests.conftest import S3_KEYS, s3_bucket

pytestmark = [pytest.mark.servers, pytest.mark.pipeline]
STAGES = {
    "plan",
    "ingest",
    "merge_proxy",
    "tune_supervisor",
    "generate_proxy",
    "tune_student",
    "tune_direct",
    "evaluate",
    "register",
}


@pytest.fixture(scope="module")
def pipeline_run(mlflow_server, s3_endpoint, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        env.setenv("PROXYTUNE_S3_ENDPOINT_URL", s3_endpoint)
        env.setenv("PROXYTUNE_S3_BUCKET", "platform")
        env.setenv("COLUMNS", "160")
        for key, value in S3_KEYS.items():
            env.setenv(key, value)
        methods = '--set=evaluation.methods=["student", "supervisor", "direct"]'
        code = main(["run", "--local", "--workdir", str(workdir), "--experiment", "e2e", methods])
    return code, workdir, json.loads((workdir / "summary.json").read_text())


def test_the_run_succeeds_and_writes_its_summary(pipeline_run):
    code, workdir, summary = pipeline_run
    assert code == 0 and summary["status"] == "succeeded"
    for method in ("student", "supervisor", "direct"):
        assert set(summary["metrics"][method]) == {"clip_i", "clip_t", "dino"}
    assert summary["report"] == str(workdir / "runs" / summary["run_id"] / "report.html")
    assert (workdir / "report.html").read_text() == Path(summary["report"]).read_text()  # the latest, on top
    assert "Proxy-Tuning report: dog" in (workdir / "report.html").read_text()
    assert summary["registered_model"]["name"] == "proxytune-dog"
    assert "challenger" in summary["registered_model"]["aliases"]


def test_mlflow_has_the_parent_run_with_one_finished_child_per_stage(pipeline_run, mlflow_server):
    _, _, summary = pipeline_run
    client = MlflowClient(mlflow_server)
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.data.tags[ROLE_TAG] == "pipeline" and parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    by_stage = {run.data.tags[STAGE_TAG]: run for run in children}
    assert set(by_stage) == STAGES
    assert all(run.info.status == "FINISHED" for run in children)
    assert all(run.data.tags[KFP_RUN_TAG] == parent.data.tags[KFP_RUN_TAG] for run in children)
    evaluate = by_stage["evaluate"].data.metrics
    metrics = summary["metrics"]
    for method in ("student", "supervisor", "direct"):
        assert evaluate[f"{method}_dino"] == pytest.approx(metrics[method]["dino"])
    gain = metrics["student"]["clip_i"] - metrics["direct"]["clip_i"]
    assert evaluate["gain_vs_direct_clip_i"] == pytest.approx(gain)
    direct = by_stage["tune_direct"].data
    assert direct.params["training_data"] == "photos" and direct.metrics["train_loss_after"] > 0
    losses = client.get_metric_history(by_stage["tune_supervisor"].info.run_id, "train_loss")
    assert len(losses) == 40
    student = by_stage["tune_student"].data.metrics
    assert student["train_loss_after"] < student["train_loss_before"]
    assert {"heldout_loss_before", "heldout_loss_after"} <= set(student)
    assert "report.html" in [a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id)]


def test_the_student_is_registered_as_challenger(pipeline_run, mlflow_server):
    _, _, summary = pipeline_run
    model = summary["registered_model"]
    version = MlflowClient(mlflow_server).get_model_version_by_alias(model["name"], "challenger")
    assert str(version.version) == model["version"]
    assert float(version.tags["dino"]) == pytest.approx(summary["metrics"]["student"]["dino"], abs=1e-6)


def test_datasets_and_artifacts_live_on_the_s3_server(pipeline_run, s3_endpoint):
    client = s3_bucket(s3_endpoint, "platform")
    platform = {o.object_name.split("/")[0] for o in client.list_objects("platform", recursive=True)}
    assert platform == {"subjects", "proxy", "token-cache"}
    artifacts = [o.object_name for o in client.list_objects("mlflow", recursive=True)]
    assert any(name.endswith("report.html") for name in artifacts)
    assert any(name.endswith("adapter_model.safetensors") for name in artifacts)


def test_no_secret_reaches_mlflow_params(pipeline_run, mlflow_server):
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("e2e")
    for run in client.search_runs([experiment.experiment_id]):
        values = " ".join(f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items())
        assert S3_KEYS["AWS_SECRET_ACCESS_KEY"] not in values
