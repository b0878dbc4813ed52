import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageChops

from proxytune.config import RunParams
from proxytune.evaluate import evaluate, read_evaluation
from proxytune.ingest import load_subject
from proxytune.metrics import PROTOCOL
from proxytune.prompts import LIVE_PROMPTS, fill
from proxytune.registry import ENCODERS
from proxytune.student import load_student
from proxytune.tracking import Tracker
from tests.conftest import CPU


class Images(HTMLParser):
    """Collects image sources and every link-like attribute of a page."""

    def __init__(self):
        super().__init__()
        self.sources, self.links, self.alts = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs["src"])
            self.alts.append(attrs["alt"])
        self.links += [attrs[a] for a in ("src", "href") if a in attrs]


def test_evaluation_scores_both_models_on_the_live_prompts(evaluation_dir, params):
    evaluation = read_evaluation(evaluation_dir)
    k, n = params.evaluation.images_per_prompt, params.evaluation.num_prompts
    (dog,) = evaluation["subjects"]
    assert (dog["subject"], dog["identifier"], dog["class_noun"]) == ("dog", "sks", "dog")
    assert evaluation["metrics"] == dog["metrics"]  # one subject: its scores are the run's
    assert set(dog["metrics"]) == {"student", "supervisor"}
    for scores in dog["metrics"].values():
        assert set(scores) == {"clip_i", "clip_t", "dino"}
    assert [p["prompt"] for p in dog["per_prompt"]["student"]] == [
        "a {identifier} {class_noun} in the jungle",
        "a {identifier} {class_noun} in the snow",
    ][:n]
    assert evaluation["student"]["sampling"] == {
        "guidance_scale": 5.0,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
    }
    samples = dog["samples"]
    assert len(samples) == 2 * n * k
    assert samples[0] == {
        "model": "student",
        "index": 0,
        "file": "dog/student/000.png",
        "prompt": "a sks dog in the jungle",
    }
    with Image.open(evaluation_dir / samples[-1]["file"]) as image:
        assert image.size == (64, 64)  # the supervisor's
    with Image.open(evaluation_dir / samples[0]["file"]) as image:
        assert image.size == (32, 32)  # the student's


def test_totals_are_the_mean_of_equal_sized_prompt_groups(evaluation_dir):
    (dog,) = read_evaluation(evaluation_dir)["subjects"]
    for model, rows in dog["per_prompt"].items():
        for metric in ("clip_i", "clip_t", "dino"):
            mean = sum(r[metric] for r in rows) / len(rows)
            assert abs(mean - dog["metrics"][model][metric]) < 1e-6


def test_report_is_self_contained_with_pictures_and_numbers(evaluation_dir, params):
    page = (evaluation_dir / "report.html").read_text()
    evaluation = json.loads((evaluation_dir / "evaluation.json").read_text())
    parser = Images()
    parser.feed(page)
    # plots, feature variance, reference photos, then one student and one supervisor grid per prompt
    assert len(parser.sources) == 3 + 2 * params.evaluation.num_prompts
    assert all(src.startswith("data:image/png;base64,") for src in parser.sources)
    assert f"{evaluation['metrics']['student']['dino']:.4f}" in page
    assert PROTOCOL in page
    assert "a sks dog in the snow" in page
    # nothing fetched from elsewhere (base64 data may contain "http" by chance, so check links)
    assert all(link.startswith("data:") for link in parser.links)
    assert "url(" not in page and "<script" not in page


def test_encoders_are_recorded_with_their_sources(evaluation_dir):
    evaluation = read_evaluation(evaluation_dir)
    assert evaluation["encoders"] == {
        "clip": {"backend": "tiny-clip", "source": "tiny:clip", "revision": None},
        "dino": {"backend": "tiny-dino", "source": "tiny:dino", "revision": None},
    }
    assert (
        "CLIP tiny-clip (tiny:clip), DINO tiny-dino (tiny:dino)."
        in (evaluation_dir / "report.html").read_text()
    )


def test_variance_samples_reproduce_from_the_recorded_seeds_and_prompts(
    evaluation_dir, subject_dir, student_dir, params
):
    """The student's variance entry, recomputed with numpy from samples drawn again on the
    documented prompts (the DreamBench list, cycled) and seeds (from `first_seed`)."""
    evaluation = read_evaluation(evaluation_dir)
    n = params.evaluation.variance_samples
    variance = evaluation["variance"]
    assert (variance["samples"], variance["first_seed"], variance["features"]) == (n, 1_000_000, "tiny-dino")
    (dog,) = evaluation["subjects"]
    assert set(dog["variance"]) == {"student", "supervisor"}
    assert variance["means"] == dog["variance"]  # one subject: its values are the run's

    backend, _ = load_student(student_dir, CPU)
    sampling = backend.sampling.override(**params.evaluation.student_sampling)
    prompts = [fill(LIVE_PROMPTS[i], "sks", "dog") for i in range(n)]
    images = backend.generate(
        prompts, [1_000_000 + i for i in range(n)], sampling, params.evaluation.batch_size
    )
    dino = ENCODERS.create("tiny-dino")
    dino.load(CPU)
    features = dino.embed_images(images).numpy().astype(np.float64)
    centroid = dino.embed_images(load_subject(subject_dir)[1]).numpy().astype(np.float64).mean(axis=0)
    distances = np.sqrt(((features - centroid) ** 2).sum(axis=1))
    assert dog["variance"]["student"] == pytest.approx(
        {
            "total_variance": np.trace(np.cov(features, rowvar=False)),
            "mean_distance": distances.mean(),
            "median_distance": np.median(distances),
        },
        abs=1e-6,
    )


def test_report_embeds_the_variance_plot_saved_beside_it(evaluation_dir):
    page = (evaluation_dir / "report.html").read_text()
    (dog,) = read_evaluation(evaluation_dir)["subjects"]
    for scores in dog["variance"].values():
        assert f"<td>{scores['total_variance']:.4f}</td><td>{scores['mean_distance']:.4f}</td>" in page
    parser = Images()
    parser.feed(page)
    embedded = parser.sources[parser.alts.index("feature variance")].removeprefix("data:image/png;base64,")
    with (
        Image.open(io.BytesIO(base64.b64decode(embedded))) as shown,
        Image.open(evaluation_dir / "variance.png") as saved,
    ):
        assert shown.size == saved.size == (900, 288)
        assert ImageChops.difference(shown.convert("RGB"), saved.convert("RGB")).getbbox() is None


@pytest.fixture(scope="module")
def saved_encoders(tmp_path_factory) -> dict[str, str]:
    """The tiny encoders written to folders, as weights staged for an air-gapped cluster."""
    folder = tmp_path_factory.mktemp("encoders")
    for name in ("tiny-clip", "tiny-dino"):
        encoder = ENCODERS.create(name)
        encoder.load(CPU)
        encoder.save(folder / name)
    return {"clip_source": str(folder / "tiny-clip"), "dino_source": str(folder / "tiny-dino")}


class Recorder(Tracker):
    """Keeps what evaluation logs to MLflow."""

    def __init__(self):
        self.params, self.metrics, self.artifacts = {}, {}, []

    def log_params(self, params):
        self.params.update(params)

    def log_metric(self, key, value, step=None):
        self.metrics[key] = value

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(Path(path).name)


QUICK = {"num_prompts": 1, "images_per_prompt": 1, "supervisor_inference_steps": 1}


def test_encoder_sources_and_variance_go_to_evaluation_json_and_mlflow(
    saved_encoders, subject_dir, supervisor_dir, student_dir, tmp_path
):
    settings = RunParams.resolve("tiny", {"evaluation": {**saved_encoders, **QUICK, "variance_samples": 3}})
    tracker = Recorder()
    evaluation = evaluate(
        subject_dir, supervisor_dir, student_dir, tmp_path, settings.evaluation, tracker, device=CPU
    )
    encoders = {
        "clip": {"backend": "tiny-clip", "source": saved_encoders["clip_source"], "revision": "local"},
        "dino": {"backend": "tiny-dino", "source": saved_encoders["dino_source"], "revision": "local"},
    }
    assert read_evaluation(tmp_path)["encoders"] == evaluation["encoders"] == encoders
    assert tracker.params["encoders"] == encoders
    assert tracker.params["dino_source"] == saved_encoders["dino_source"]
    report = (tmp_path / "report.html").read_text()
    assert f"DINO tiny-dino ({saved_encoders['dino_source']}, local copy)." in report
    means = evaluation["variance"]["means"]
    assert {k: v for k, v in tracker.metrics.items() if "variance" in k or "distance" in k} == {
        f"{model}_{key}": means[model][key]
        for model in ("student", "supervisor")
        for key in ("total_variance", "mean_distance", "median_distance")
    }
    assert tracker.artifacts == ["report.html", "evaluation.json", "comparison.md", "variance.png"]


def test_variance_samples_zero_turns_the_analysis_off(subject_dir, supervisor_dir, student_dir, tmp_path):
    settings = RunParams.resolve("tiny", {"evaluation": {**QUICK, "variance_samples": 0}})
    tracker = Recorder()
    evaluation = evaluate(
        subject_dir, supervisor_dir, student_dir, tmp_path, settings.evaluation, tracker, device=CPU
    )
    assert "variance" not in evaluation and "variance" not in evaluation["subjects"][0]
    assert not (tmp_path / "variance.png").exists() and "variance.png" not in tracker.artifacts
    assert "Feature spread" not in (tmp_path / "report.html").read_text()
    assert not [k for k in tracker.metrics if "variance" in k or "distance" in k]


def test_a_missing_encoder_folder_fails_before_any_sampling(subject_dir, supervisor_dir, tmp_path):
    missing = tmp_path / "missing"
    settings = RunParams.resolve("tiny", {"evaluation.dino_source": str(missing)}).evaluation
    # the student folder does not exist either: sampling first would fail on it instead
    with pytest.raises(FileNotFoundError, match=re.escape(f"tiny-dino: no folder '{missing}'")):
        evaluate(subject_dir, supervisor_dir, tmp_path / "no-student", tmp_path / "out", settings, device=CPU)
    assert not (tmp_path / "out").exists()


def test_the_comparison_table_gives_the_students_gain_over_its_supervisor(evaluation_dir):
    from proxytune.report import markdown_table

    metrics = read_evaluation(evaluation_dir)["metrics"]
    lines = (evaluation_dir / "comparison.md").read_text().splitlines()
    assert lines[0] == "| metric | student | supervisor | student − supervisor | relative gain |"
    rows = {
        cells[0]: cells[1:]
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    }
    for key, label in (("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("dino", "DINO")):
        student, supervisor = metrics["student"][key], metrics["supervisor"][key]
        relative = (student - supervisor) / abs(supervisor)
        assert rows[label] == [
            f"{student:.4f}",
            f"{supervisor:.4f}",
            f"{student - supervisor:+.4f}",
            f"{relative:+.2%}",
        ]
    report = (evaluation_dir / "report.html").read_text()
    assert "<th>relative gain</th>" in report
    alone = markdown_table({"student": metrics["student"]})  # a black-box supervisor: the student only
    assert alone.splitlines()[0] == "| metric | student |" and len(alone.splitlines()) == 5
