"""The pipeline on the embedded defaults (`make demo`): no servers, any folder of photos."""

import json
import os

import pytest
from PIL import Image, ImageOps

from proxytune.cli import main
from tests.conftest import EXAMPLE

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def own_subject(tmp_path_factory):
    """A user's folder: four photos of an object, mixed formats, none from examples/."""
    folder = tmp_path_factory.mktemp("my photos") / "red-teapot"
    folder.mkdir()
    for i, source in enumerate(sorted(EXAMPLE.glob("*.jpg"))[:4]):
        image = ImageOps.mirror(Image.open(source)).rotate(90 * i)
        image.save(folder / (f"IMG_{i}.png" if i % 2 else f"IMG_{i}.jpeg"))
    return folder


def test_any_photo_folder_runs_on_the_embedded_defaults(own_subject, tmp_path, monkeypatch):
    """No servers: MLflow on SQLite and the store in the workdir, as in `make demo`."""
    for variable in ("MLFLOW_TRACKING_URI", "PROXYTUNE_S3_ENDPOINT_URL", "PROXYTUNE_STORE_DIR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("COLUMNS", "160")
    small = ["proxy.num_images=4", "supervisor.steps=4", "student.steps=4", "evaluation.num_prompts=1"]
    arguments = [
        "run",
        "--local",
        "--subject",
        str(own_subject),
        "--class-noun",
        "teapot",
        "--workdir",
        str(tmp_path),
    ]
    assert main(arguments + [f"--set={s}" for s in small]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["registered_model"]["name"] == "proxytune-red-teapot"
    assert summary["registered_model"]["aliases"] == ["challenger", "champion"]
    assert summary["mlflow"]["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert {p.name for p in (tmp_path / "store").iterdir()} == {"subjects", "proxy", "token-cache"}
    assert "a sks teapot in the jungle" in (tmp_path / "report.html").read_text()  # the object prompt list
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the run restored the environment
