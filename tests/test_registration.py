import base64
import io

import mlflow
import pytest
from mlflow import MlflowClient
from PIL import Image

from proxytune.registration import gate, register
from proxytune.tracking import TrackingContext, stage_run


def evaluation(dino, clip_i, subject="dog"):
    scores = {"clip_i": clip_i, "clip_t": 0.3, "dino": dino}
    return {
        "subjects": [{"subject": subject, "class_noun": "dog", "identifier": "sks"}],
        "metrics": {"student": scores, "supervisor": {"clip_i": 0.8, "clip_t": 0.31, "dino": 0.7}},
    }


def test_gate_compares_dino_and_clip_i_with_the_champion():
    assert gate({"dino": 0.1, "clip_i": 0.1}, None) == (True, "no champion yet")
    assert gate({"dino": 0.8, "clip_i": 0.8}, {"dino": 0.8, "clip_i": 0.7})[0]
    passed, reason = gate({"dino": 0.7, "clip_i": 0.9}, {"dino": 0.8, "clip_i": 0.7})
    assert not passed and reason == "worse than the champion on dino 0.7000 < 0.8000"


def test_versions_get_challenger_and_the_gate_moves_champion(student_dir, sqlite_tracking):
    def run(number, dino, clip_i):
        context = TrackingContext(experiment="registry", kfp_run_id=f"run-{number}")
        with stage_run(context, "register") as tracker:
            return register(student_dir, evaluation(dino, clip_i), "proxytune-dog", context, tracker)

    first = run(1, 0.70, 0.80)
    assert (first.version, first.aliases, first.gate_passed) == ("1", ["challenger", "champion"], True)
    worse = run(2, 0.60, 0.90)
    assert (worse.version, worse.aliases, worse.previous_champion) == ("2", ["challenger"], "1")
    assert "dino 0.6000 < 0.7000" in worse.gate_reason
    better = run(3, 0.75, 0.80)
    assert better.aliases == ["challenger", "champion"]

    client = MlflowClient(sqlite_tracking)
    assert str(client.get_model_version_by_alias("proxytune-dog", "champion").version) == "3"
    assert str(client.get_model_version_by_alias("proxytune-dog", "challenger").version) == "3"
    version = client.get_model_version("proxytune-dog", "2")
    assert version.tags["dino"] == "0.600000" and version.tags["gate"].startswith("failed")


def test_the_registered_model_generates_images(student_dir, sqlite_tracking):
    context = TrackingContext(experiment="serving", kfp_run_id="serve")
    with stage_run(context, "register") as tracker:
        register(student_dir, evaluation(0.5, 0.5, "served"), "proxytune-served", context, tracker)
    model = mlflow.pyfunc.load_model("models:/proxytune-served@champion")
    pngs = model.predict(["a sks dog in the snow", "a sks dog"], params={"seed": 1})
    images = [Image.open(io.BytesIO(base64.b64decode(p))) for p in pngs]
    assert [(im.format, im.size) for im in images] == [("PNG", (32, 32))] * 2


def test_register_needs_mlflow(student_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from proxytune.tracking import Tracker

    with pytest.raises(ValueError, match="register needs MLflow"):
        register(student_dir, evaluation(0.5, 0.5), "m", TrackingContext(), Tracker())
