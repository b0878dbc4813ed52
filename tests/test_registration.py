"""The model registry against a real `mlflow server`: registration, the gate, promotion,
rollback, races between registrations, and the served model honouring its parameters."""

import base64
import io
import json
import os
import subprocess
import threading
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from PIL import Image

from proxytune.core.params import RegistryParams
from proxytune.core.tracking import TrackingContext, stage_run
from proxytune.stages.registration import (
    CHAMPION,
    PREVIOUS,
    alias_version,
    contest,
    describe_versions,
    gate,
    promote,
    register,
    rollback,
)
from tests.conftest import BIN

FAST = RegistryParams(settle_seconds=0.5)


def evaluation(dino, clip_i, clip_t=0.3, subject="dog"):
    scores = {"clip_i": clip_i, "clip_t": clip_t, "dino": dino}
    return {
        "subjects": [{"subject": subject, "class_noun": "dog", "identifier": "sks"}],
        "metrics": {"student": scores, "supervisor": {"clip_i": 0.8, "clip_t": 0.31, "dino": 0.7}},
    }


@pytest.fixture
def tracking(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    return MlflowClient(mlflow_server)


def bare_version(client, name, dino, clip_i, clip_t=0.3) -> str:
    """A version with metric tags only (no logged model): what the contest reads."""
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    tags = {"dino": str(dino), "clip_i": str(clip_i), "clip_t": str(clip_t)}
    return str(client.create_model_version(name, "s3://mlflow/none", tags=tags).version)


def test_the_gate_allows_the_configured_drop_per_metric():
    champion = {"dino": 0.8, "clip_i": 0.8, "clip_t": 0.30}
    assert gate({"dino": 0.1, "clip_i": 0.1, "clip_t": 0.1}, None) == (True, "no champion yet")
    assert gate({"dino": 0.8, "clip_i": 0.8, "clip_t": 0.291}, champion)[0]  # CLIP-T may drop 0.01
    passed, reason = gate({"dino": 0.8, "clip_i": 0.8, "clip_t": 0.28}, champion)
    assert not passed and reason == "worse than the champion on clip_t 0.2800 < 0.3000"
    passed, reason = gate({"dino": 0.79, "clip_i": 0.9, "clip_t": 0.3}, champion)
    assert not passed and "dino 0.7900 < 0.8000" in reason
    assert gate({"dino": 0.75, "clip_i": 0.8, "clip_t": 0.3}, champion, {"dino": 0.1})[0]
    with pytest.raises(ValueError, match="unknown gate metric"):
        RegistryParams(gate={"fid": 1.0})


def test_versions_get_challenger_and_the_gate_moves_champion(student_dir, tracking):
    def run(number, dino, clip_i):
        context = TrackingContext(experiment="registry", kfp_run_id=f"registry-run-{number}")
        with stage_run(context, "register") as tracker:
            return register(student_dir, evaluation(dino, clip_i), "gated", context, tracker, FAST)

    first = run(1, 0.70, 0.80)
    assert (first.version, first.aliases, first.gate_passed) == ("1", ["challenger", "champion"], True)
    worse = run(2, 0.60, 0.90)
    assert (worse.version, worse.aliases, worse.previous_champion) == ("2", ["challenger"], "1")
    assert "dino 0.6000 < 0.7000 (champion: version 1)" in worse.gate_reason
    better = run(3, 0.75, 0.80)
    assert better.aliases == ["challenger", "champion"]

    assert alias_version(tracking, "gated", "champion") == "3"
    assert alias_version(tracking, "gated", "challenger") == "3"
    assert alias_version(tracking, "gated", PREVIOUS) == "1"
    version = tracking.get_model_version("gated", "2")
    assert version.tags["dino"] == "0.600000" and version.tags["gate"].startswith("failed: worse")
    assert version.tags["proxytune.kfp_run_id"] == "registry-run-2"
    assert tracking.get_model_version("gated", "3").tags["gate.champion_before"] == "1"
    (run_3,) = tracking.search_runs(
        [tracking.get_experiment_by_name("registry").experiment_id],
        filter_string="tags.registered_version = '3'",
    )
    assert run_3.data.tags["promoted"] == "true" and run_3.data.tags["gate"].startswith("no worse")


def test_promote_through_the_gate_or_forced_and_rollback_are_audited(tracking):
    name = "promotions"
    champion = bare_version(tracking, name, 0.8, 0.8)
    assert contest(tracking, name, champion, FAST).promoted
    worse = bare_version(tracking, name, 0.7, 0.9)

    refused = promote(tracking, name, worse, policy=FAST)
    assert not refused.promoted and "dino 0.7000 < 0.8000" in refused.reason
    assert alias_version(tracking, name, CHAMPION) == champion
    forced = promote(tracking, name, worse, force=True, policy=FAST)
    assert forced.promoted and forced.reason == "forced"
    assert (alias_version(tracking, name, CHAMPION), alias_version(tracking, name, PREVIOUS)) == (
        worse,
        champion,
    )
    audits = [v for k, v in tracking.get_model_version(name, worse).tags.items() if k.startswith("audit.")]
    assert len(audits) == 2 and any(a.startswith("forced promotion: promoted (forced) by ") for a in audits)

    assert rollback(tracking, name) == (worse, champion)
    assert (
        alias_version(tracking, name, CHAMPION) == champion
        and alias_version(tracking, name, PREVIOUS) is None
    )
    tags = tracking.get_model_version(name, champion).tags
    assert any(v.startswith(f"rollback: champion again, replacing version {worse}") for v in tags.values())
    with pytest.raises(ValueError, match="no previous-champion to roll back to"):
        rollback(tracking, name)
    rows = describe_versions(tracking, name)
    assert [(r["version"], r["aliases"]) for r in rows] == [(worse, ""), (champion, "champion")]
    assert rows[0]["gate"].startswith("passed: forced") and rows[0]["audits"] == "3"


def test_the_cli_lists_promotes_and_rolls_back_with_exit_codes(tracking, capsys, monkeypatch):
    from proxytune.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    name = "cli-model"
    champion = bare_version(tracking, name, 0.8, 0.8)
    assert main(["promote", name, champion]) == 0
    worse = bare_version(tracking, name, 0.7, 0.7)
    assert main(["promote", name, worse]) == 3  # the gate refuses it
    assert "not promoted" in capsys.readouterr().out
    assert main(["promote", name, worse, "--force"]) == 0
    assert main(["rollback", name]) == 0
    assert f"{name}: champion v{worse} -> v{champion}" in capsys.readouterr().out
    assert main(["models", name]) == 0
    listing = capsys.readouterr().out
    assert "passed: forced" in listing and "champion" in listing and "0.8" in listing
    assert main(["models"]) == 0 and name in capsys.readouterr().out
    assert main(["promote", "no-such-model", "1"]) == 2
    assert main(["rollback", name]) == 2
    assert "no previous-champion to roll back to" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("first", "second", "winner"),
    [((0.8, 0.8), (0.7, 0.7), 0), ((0.7, 0.7), (0.7, 0.7), 1)],
    ids=["the-better-wins", "a-tie-goes-to-the-newer"],
)
def test_concurrent_registrations_end_with_one_champion_and_tags_that_say_why(
    tracking, first, second, winner
):
    name = f"race-{winner}"
    versions = [bare_version(tracking, name, *first), bare_version(tracking, name, *second)]
    decisions = [None, None]
    start = threading.Barrier(2)

    def contend(i):
        start.wait()
        try:
            decisions[i] = contest(MlflowClient(mlflow.get_tracking_uri()), name, versions[i], FAST)
        except Exception as error:  # shown by the assertion below instead of lost in the thread
            decisions[i] = error

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not [d for d in decisions if isinstance(d, Exception)], decisions
    champion, loser = versions[winner], versions[1 - winner]
    assert alias_version(tracking, name, CHAMPION) == champion
    assert decisions[winner].promoted
    assert tracking.get_model_version(name, champion).tags["gate"].startswith("passed")
    lost = tracking.get_model_version(name, loser).tags["gate"]
    # the loser either lost the contest (its tags name the winner) or was promoted first and
    # then displaced by the winner, which judged it and keeps it as previous-champion
    assert (lost.startswith("failed") and f"champion: version {champion}" in lost) or (
        alias_version(tracking, name, PREVIOUS) == loser
    )
    assert not decisions[1 - winner].promoted or alias_version(tracking, name, PREVIOUS) == loser


@pytest.fixture(scope="module")
def served(student_dir, mlflow_server):
    mlflow.set_tracking_uri(mlflow_server)
    context = TrackingContext(mlflow_server, experiment="serving", kfp_run_id="serve")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        with stage_run(context, "register") as tracker:
            register(student_dir, evaluation(0.5, 0.5, subject="served"), "served", context, tracker, FAST)
    return mlflow.pyfunc.load_model("models:/served@champion")


def pixels(frame) -> list[bytes]:
    return [Image.open(io.BytesIO(png)).tobytes() for png in frame["image"]]


def test_the_served_model_honours_seed_and_num_images(served):
    prompts = ["a sks dog in the snow", "a sks dog"]
    frame = served.predict(prompts, params={"seed": 1, "num_images": 2})
    assert list(frame["prompt"]) == [prompts[0]] * 2 + [prompts[1]] * 2
    assert list(frame["seed"]) == [1, 2, 3, 4]
    assert {Image.open(io.BytesIO(png)).format for png in frame["image"]} == {"PNG"}
    same = served.predict(prompts, params={"seed": 1, "num_images": 2})
    other = served.predict(prompts, params={"seed": 9, "num_images": 2})
    assert pixels(same) == pixels(frame)
    assert all(a != b for a, b in zip(pixels(other), pixels(frame), strict=True))
    guided = served.predict(prompts[:1], params={"seed": 1, "guidance_scale": 1.0, "top_k": 8})
    assert pixels(guided) != pixels(frame)[:1]  # the sampling params reach the model


def test_the_served_model_declares_its_params_and_ships_its_code(served):
    signature = served.metadata.signature
    defaults = {p.name: p.default for p in signature.params.params}
    assert defaults == {
        "seed": 0,
        "num_images": 1,
        "guidance_scale": 5.0,  # tiny-janus: Janus-Pro's reference sampling
        "top_k": 0,
        "temperature": 1.0,
        "top_p": 1.0,
    }
    assert served.metadata.metadata["backend"] == "tiny-janus"
    local = mlflow.artifacts.download_artifacts("models:/served/1")
    requirements = Path(local, "requirements.txt").read_text().split()
    assert "torch==2.13.0" in requirements
    assert not any(r.startswith(("proxytune", "kfp")) for r in requirements)
    listed = subprocess.run(["find", local, "-name", "model.py"], capture_output=True, text=True).stdout
    assert f"{local}/code/proxytune/serving/model.py" in listed


def test_mlflow_models_predict_serves_images_with_the_given_params(served, mlflow_server, tmp_path):
    request = {"inputs": ["a sks dog"], "params": {"seed": 4, "num_images": 2}}
    (tmp_path / "request.json").write_text(json.dumps(request))
    command = ["models", "predict", "-m", "models:/served@champion", "-i", "request.json", "-t", "json"]
    subprocess.run(
        [str(BIN / "mlflow"), *command, "-o", "response.json", "--env-manager", "local"],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server},
        check=True,
        capture_output=True,
        timeout=300,
    )
    rows = json.loads((tmp_path / "response.json").read_text())["predictions"]
    assert [r["seed"] for r in rows] == [4, 5]
    direct = served.predict(["a sks dog"], params={"seed": 4, "num_images": 2})
    assert [Image.open(io.BytesIO(base64.b64decode(r["image"]))).tobytes() for r in rows] == pixels(direct)


def test_register_needs_mlflow(student_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from proxytune.core.tracking import Tracker

    with pytest.raises(ValueError, match="register needs MLflow"):
        register(student_dir, evaluation(0.5, 0.5), "m", TrackingContext(), Tracker())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to a UID without a passwd entry")
def test_promote_and_rollback_as_a_uid_without_a_passwd_entry_are_audited(tracking, tmp_path):
    """As OpenShift runs pods: an arbitrary UID in group 0, no passwd entry, no USER/LOGNAME."""
    import pwd

    uid = 54321
    with pytest.raises(KeyError):
        pwd.getpwuid(uid)
    name = "arbitrary-uid"
    champion = bare_version(tracking, name, 0.8, 0.8)
    assert contest(tracking, name, champion, FAST).promoted
    other = bare_version(tracking, name, 0.7, 0.7)
    tmp_path.chmod(0o777)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": tracking.tracking_uri}
    as_uid = ["setpriv", f"--reuid={uid}", "--regid=0", "--clear-groups", str(BIN / "proxytune")]
    for command in (["promote", name, other, "--force"], ["rollback", name]):
        result = subprocess.run([*as_uid, *command], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
    audits = [v for k, v in tracking.get_model_version(name, other).tags.items() if k.startswith("audit.")]
    assert len(audits) == 2 and all(f" by uid-{uid}@" in audit for audit in audits)
    assert alias_version(tracking, name, CHAMPION) == champion
