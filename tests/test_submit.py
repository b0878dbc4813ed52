"""`proxytune submit` and `schedule` through the real kfp client against the fake Kubeflow
Pipelines REST API (`tests/kfp_fake.py`), and `submit --wait`'s outcome read from a real
MLflow tracking server's model registry."""

import textwrap
import uuid

import pytest
from mlflow import MlflowClient

from proxytune.cli import main
from proxytune.core.tracking import KFP_RUN_TAG
from proxytune.ops.submit import kfp_cron
from tests.kfp_fake import API, serve_kubeflow

IMAGE = "registry.example/proxytune:abc1234"
FAST = ["--poll-interval", "0.01"]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def kubeflow(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no kfp context file of the user's
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with serve_kubeflow() as served:
        yield served


@pytest.fixture
def model_name() -> str:
    return f"proxytune-rex-{uuid.uuid4().hex[:8]}"  # one registered model per test on the shared server


@pytest.fixture
def config(tmp_path, model_name):
    path = tmp_path / "rex.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            subjects:
              - {{uri: s3://proxytune/subjects/rex, class_noun: dog}}
              - {{uri: s3://proxytune/subjects/bag, class_noun: backpack, proxy_uri: s3://renders/bag}}
            preset: small
            overrides: {{student.steps: 500, proxy.shards: 4}}
            registered_model_name: {model_name}
            experiment: rex
            """
        )
    )
    return path


def submit(host, config, *extra):
    return main(["submit", "--host", host, "--config", str(config), f"--image={IMAGE}", *extra])


def registered(tracking_uri, name, run_id, champion: bool, gate: str):
    """What `register` leaves in the registry for a run: a version tagged with the run id and
    the metrics, the gate's verdict, `challenger`, and `champion` when promoted."""
    client = MlflowClient(tracking_uri)
    client.create_registered_model(name)
    tags = {KFP_RUN_TAG: run_id, "clip_i": "0.812300", "clip_t": "0.301200", "dino": "0.654300"}
    tags |= {"supervisor_clip_i": "0.850000", "gate": gate}
    version = client.create_model_version(name, "s3://mlflow/artifacts/student", tags=tags).version
    client.set_registered_model_alias(name, "challenger", version)
    if champion:
        client.set_registered_model_alias(name, "champion", version)
    return version


def test_submit_starts_a_run_with_the_config_arguments(kubeflow, config, model_name, capsys):
    host, api = kubeflow
    assert submit(host, config) == 0
    out = capsys.readouterr().out
    assert f"run: {host}/#/runs/details/run-1" in out and f"started run {model_name}-" in out
    (run,) = api.runs
    assert run["display_name"].startswith(f"{model_name}-") and run["display_name"].endswith("Z")
    assert run["experiment_id"] == api.experiments["rex"]  # the config's experiment, created
    assert run["runtime_config"]["parameters"] == {
        "subject_uri": "s3://proxytune/subjects/rex",
        "class_noun": "dog",
        "subject_name": "rex",
        "identifier": "sks",
        "proxy_uri": "",
        "extra_subjects": [
            {
                "uri": "s3://proxytune/subjects/bag",
                "class_noun": "backpack",
                "name": "bag",
                "identifier": "ohwx",
                "proxy_uri": "s3://renders/bag",
            }
        ],
        "preset": "small",
        "overrides": {"student.steps": 500, "proxy.shards": 4},
        "mlflow_experiment": "rex",
        "registered_model_name": model_name,
    }
    spec = run["pipeline_spec"]["pipeline_spec"]  # compiled here with the cluster options, as `compile` does
    assert set(run["runtime_config"]["parameters"]) <= set(spec["root"]["inputDefinitions"]["parameters"])
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {IMAGE}
    assert ("GET", f"{API}/runs/run-1") not in api.requests  # without --wait it does not poll
    assert run["service_account"] == "proxytune-runner"  # the account manifests/ grants what steps need
    assert submit(host, config, "--service-account=team-a-runner") == 0
    assert submit(host, config, "--service-account=") == 0
    assert [r.get("service_account") for r in api.runs[1:]] == ["team-a-runner", None]  # '': KFP's default


@pytest.mark.servers
def test_wait_exits_0_when_the_run_registered_the_champion(
    kubeflow, config, model_name, mlflow_server, monkeypatch, capsys
):
    host, api = kubeflow
    run_id = str(uuid.uuid4())
    api.run_ids = [run_id]
    api.states = ["PENDING", "RUNNING", "SUCCEEDED"]
    api.fail_gets = 1  # an API server restart while waiting is retried
    registered(mlflow_server, model_name, run_id, champion=True, gate="passed: no champion yet")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # the default for --mlflow-tracking-uri
    assert submit(host, config, "--wait", *FAST) == 0
    out = capsys.readouterr().out
    assert f"run: {host}/#/runs/details/{run_id}" in out
    assert f"registered: {model_name} v1, aliases: challenger, champion" in out, out
    assert "gate:       passed: no champion yet" in out
    for metric, value in (("clip_i", "0.8123"), ("clip_t", "0.3012"), ("dino", "0.6543")):
        assert any(metric in line and value in line for line in out.splitlines()), out
    assert any("supervisor_clip_i" in line and "0.8500" in line for line in out.splitlines())
    assert api.requests.count(("GET", f"{API}/runs/{run_id}")) == 4  # one refused, three states


@pytest.mark.servers
def test_wait_exits_3_when_the_version_was_not_promoted(kubeflow, config, model_name, mlflow_server, capsys):
    host, api = kubeflow
    run_id = str(uuid.uuid4())
    api.run_ids = [run_id]
    gate = "failed: worse than the champion on dino 0.6543 < 0.7000"
    registered(mlflow_server, model_name, run_id, champion=False, gate=gate)
    assert submit(host, config, "--wait", "--mlflow-tracking-uri", mlflow_server, *FAST) == 3
    out = capsys.readouterr().out
    assert f"registered: {model_name} v1, aliases: challenger" in out and f"gate:       {gate}" in out
    assert "not promoted" in out and f"{host}/#/runs/details/{run_id}" in out
    assert any("dino" in line and "0.6543" in line for line in out.splitlines())


@pytest.mark.parametrize("state", ["FAILED", "CANCELED"])
def test_wait_exits_1_when_the_run_does_not_succeed(kubeflow, config, state, capsys):
    host, api = kubeflow
    api.states = ["RUNNING", state]
    assert submit(host, config, "--wait", "--mlflow-tracking-uri", "http://127.0.0.1:9", *FAST) == 1
    assert f"run {state.lower()}: {host}/#/runs/details/run-1" in capsys.readouterr().out


def test_wait_exits_1_when_the_run_outlasts_the_timeout(kubeflow, config, capsys):
    host, api = kubeflow
    api.states = ["RUNNING"]
    waiting = ["--wait", "--timeout", "0.3", "--mlflow-tracking-uri", "http://127.0.0.1:9", *FAST]
    assert submit(host, config, *waiting) == 1
    out = capsys.readouterr().out
    assert f"still running after 0.3 s; it goes on: {host}/#/runs/details/run-1" in out
    assert api.requests.count(("GET", f"{API}/runs/run-1")) > 2


@pytest.mark.servers
def test_wait_exits_1_when_no_version_carries_the_run_id(kubeflow, config, mlflow_server, capsys):
    host, api = kubeflow
    api.run_ids = [f"never-registered-{uuid.uuid4()}"]  # the server is shared with other tests' runs
    run_id = api.run_ids[0]
    assert submit(host, config, "--wait", "--mlflow-tracking-uri", mlflow_server, *FAST) == 1
    out = capsys.readouterr().out
    assert f"no model version in {mlflow_server} carries proxytune.kfp_run_id = {run_id}" in out


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("unknown", "rex.yaml: unknown key 'colour'"),
        ("local", "rex.yaml: subjects[0].uri: a cluster run reads s3://bucket/prefix, not a local folder"),
        ("no-mlflow", "--wait reads the outcome from MLflow: give --mlflow-tracking-uri"),
    ],
)
def test_bad_arguments_exit_2_before_any_request(kubeflow, config, tmp_path, setting, message, capsys):
    host, api = kubeflow
    text = config.read_text()
    if setting == "unknown":
        config.write_text(text + "colour: red\n")
    if setting == "local":
        config.write_text(text.replace("s3://proxytune/subjects/rex", "photos/rex"))
    assert submit(host, config, *(["--wait"] if setting == "no-mlflow" else [])) == 2
    assert message in capsys.readouterr().out
    assert api.requests == []


def test_a_refused_run_exits_2_with_the_reason(kubeflow, config, capsys):
    host, api = kubeflow
    api.refuse = True
    assert submit(host, config) == 2
    out = capsys.readouterr().out
    assert f"Kubeflow Pipelines at {host} refused the run: 403" in out and "user is not authorized" in out


def test_schedule_creates_then_replaces_the_recurring_run_of_that_name(kubeflow, config, model_name, capsys):
    host, api = kubeflow
    schedule = ["schedule", "--host", host, "--config", str(config), f"--image={IMAGE}"]
    assert main([*schedule, "--cron", "0 3 * * 1"]) == 0
    out = capsys.readouterr().out
    (first_id, first), *_ = api.recurring_runs.items()
    assert f"created recurring run {model_name} (id {first_id}), cron '0 0 3 * * 1'" in out
    assert f"recurring run: {host}/#/recurringrun/details/{first_id}" in out
    assert first["display_name"] == model_name and first["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
    assert first["experiment_id"] == api.experiments["rex"] and first["mode"] == "ENABLE"
    assert int(first["max_concurrency"]) == 1 and first["no_catchup"] is True
    assert first["service_account"] == "proxytune-runner"
    parameters = first["runtime_config"]["parameters"]
    assert parameters["subject_uri"] == "s3://proxytune/subjects/rex" and parameters["preset"] == "small"
    assert parameters["overrides"] == {"student.steps": 500, "proxy.shards": 4}

    before = len(api.requests)
    assert main([*schedule, "--cron", "0 30 4 * * MON-FRI"]) == 0
    out = capsys.readouterr().out
    ((second_id, second),) = api.recurring_runs.items()  # the first one is gone
    assert second_id != first_id and second["trigger"]["cron_schedule"]["cron"] == "0 30 4 * * MON-FRI"
    assert f"replaced recurring run {model_name} (id {second_id})" in out
    assert f"deleted the previous one(s) of that name: {first_id}" in out
    replacing = api.requests[before:]
    created = replacing.index(("POST", f"{API}/recurringruns"))
    assert created < replacing.index(("DELETE", f"{API}/recurringruns/{first_id}"))  # create, then delete

    assert main([*schedule, "--cron", "0 3 * * 1", "--name", "rex-nightly"]) == 0
    assert {r["display_name"] for r in api.recurring_runs.values()} == {model_name, "rex-nightly"}


@pytest.mark.parametrize(
    ("cron", "kfp"),
    [
        ("0 3 * * 1", "0 0 3 * * 1"),  # standard cron: seconds 0 in front
        ("*/15 9-17 * * MON-FRI", "0 */15 9-17 * * MON-FRI"),
        ("30 0 4 1,15 jan-jun ?", "30 0 4 1,15 jan-jun ?"),  # already KFP's 6 fields
    ],
)
def test_cron_expressions_become_kfp_six_field_ones(cron, kfp):
    assert kfp_cron(cron) == kfp


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("@daily", "expected 5 fields (minute hour day-of-month month day-of-week"),
        ("0 3 * *", "got 4"),
        ("0 0 0 3 * * 1", "got 7"),
        ("0 24 * * *", "hour field '24': '24' is not a number in 0-23"),
        ("0 3 * * 8", "day of week field '8'"),
        ("0 3 * * 1/0", "step '0' must be a positive number"),
        ("0 5-2 * * *", "range '5-2' runs backwards"),
    ],
)
def test_a_bad_cron_is_refused_before_any_request(kubeflow, config, cron, message, capsys):
    host, api = kubeflow
    assert main(["schedule", "--host", host, "--config", str(config), "--cron", cron]) == 2
    out = capsys.readouterr().out
    assert f"--cron '{cron}'" in out and message in out
    assert api.requests == []


@pytest.mark.parametrize("command", ["upload", "submit", "schedule"])
def test_a_backend_older_than_the_pipeline_needs_is_refused_naming_both_versions(
    kubeflow, config, command, capsys
):
    host, api = kubeflow
    api.version = "2.14.3"
    config_args = ["--config", str(config)]
    args = {"upload": [], "submit": config_args, "schedule": [*config_args, "--cron", "0 3 * * 1"]}
    assert main([command, "--host", host, f"--image={IMAGE}", *args[command]]) == 2
    out = capsys.readouterr().out
    assert f"Kubeflow Pipelines at {host} is version 2.14.3" in out and "needs 2.15.0 or later" in out
    assert [method for method, _ in api.requests] == ["GET"] * len(api.requests)  # nothing sent


@pytest.mark.parametrize("version", ["2.15.0", "v2.17.3", "unknown"])
def test_a_backend_at_or_above_the_minimum_or_one_that_does_not_say_is_used(kubeflow, config, version):
    host, api = kubeflow
    api.version = version
    assert submit(host, config) == 0
    assert len(api.runs) == 1
