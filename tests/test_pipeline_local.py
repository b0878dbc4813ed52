"""The pipeline on the embedded defaults (`make demo`): no servers, any folder of photos."""

import json
import os

import pytest
from mlflow import MlflowClient
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


@pytest.fixture(scope="module")
def renders(tmp_path_factory):
    """Images of the example dog made by some other supervisor, one with a caption."""
    folder = tmp_path_factory.mktemp("renders")
    for i, source in enumerate(sorted(EXAMPLE.glob("*.jpg"))[:4]):
        Image.open(source).rotate(180).save(folder / f"render-{i}.png")
    (folder / "render-2.txt").write_text("a ohwx dog on a sofa")
    return folder


def test_any_photo_folders_run_on_the_embedded_defaults_as_one_student(
    own_subject, renders, tmp_path, monkeypatch
):
    """No servers: MLflow on SQLite and the store in the workdir, as in `make demo`; two
    subjects (a user's folder and the example) make one multi-subject Lumina-mGPT student,
    the first taught by a tuned FLUX supervisor, the second by a black box's imported images."""
    for variable in ("MLFLOW_TRACKING_URI", "PROXYTUNE_S3_ENDPOINT_URL", "PROXYTUNE_STORE_DIR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("COLUMNS", "160")
    small = ["proxy.num_images=4", "supervisor.steps=4", "student.steps=4", "evaluation.num_prompts=1"]
    small.append("student.backend=tiny-lumina")  # the paper's student family, as a tiny model
    small.append("proxy.shards=2")  # each subject's proxy set drawn by two tasks, then merged
    small.append("supervisor.backend=tiny-flux")  # a flow-matching DiT supervisor family
    small.append("proxy.keep_fraction=0.75")  # keep the 3 of 4 proxy images most like the photos
    arguments = [
        "run",
        "--local",
        "--subject",
        str(own_subject),
        "--class-noun",
        "teapot",
        "--subject",
        str(EXAMPLE),
        "--class-noun",
        "dog",
        "--proxy-from",
        "",
        "--proxy-from",
        str(renders),
        "--workdir",
        str(tmp_path),
    ]
    assert main(arguments + [f"--set={s}" for s in small]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["registered_model"]["name"] == "proxytune-red-teapot-dog"
    assert summary["registered_model"]["aliases"] == ["challenger", "champion"]
    assert summary["mlflow"]["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert {p.name for p in (tmp_path / "store").iterdir()} == {"subjects", "proxy", "token-cache"}
    report = (tmp_path / "report.html").read_text()
    assert "a sks teapot on top of pink fabric" not in report  # one prompt per subject
    assert "a sks teapot in the jungle" in report and "a ohwx dog in the jungle" in report
    assert "Means over the subjects below" in report and "tiny-lumina" in report and "tiny-flux" in report
    assert f"a black box (images imported from {renders})" in report
    assert set(summary["metrics"]) == {"student", "supervisor"}  # the supervisor's: the teapot's FLUX
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    experiment = client.get_experiment_by_name("proxytune").experiment_id
    (student,) = client.search_runs([experiment], filter_string="tags.`proxytune.stage` = 'tune_student'")
    assert student.data.params["train_images"] == str(2 * 2)  # 3 kept proxy images per subject, 1 held out
    (manifest,) = (tmp_path / "store" / "proxy").glob("*/manifest.jsonl")  # the drawn set; imports stay put
    assert [json.loads(line)["seed"] for line in manifest.read_text().splitlines()] == [0, 1, 2, 3]
    assert sorted(p.name for p in (manifest.parent / "parts").iterdir()) == [
        "000-of-002.jsonl",
        "001-of-002.jsonl",
    ]
    imports = "tags.`proxytune.stage` = 'generate_proxy' and params.supervisor = 'imported'"
    (imported,) = client.search_runs([experiment], filter_string=imports)
    assert imported.data.params["source_uri"] == str(renders)
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the run restored the environment
