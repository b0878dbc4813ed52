import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageChops

from proxytune.analysis.metrics import PROTOCOL
from proxytune.backends._tuned import load_student
from proxytune.core.config import RunParams
from proxytune.core.params import EVAL_METHODS
from proxytune.core.prompts import LIVE_PROMPTS, fill
from proxytune.core.registry import ENCODERS
from proxytune.core.tracking import Tracker
from proxytune.stages.evaluate import evaluate, read_evaluation
from proxytune.stages.ingest import load_subject
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


def test_evaluation_scores_every_method_on_the_live_prompts(evaluation_dir, params):
    evaluation = read_evaluation(evaluation_dir)
    k, n = params.evaluation.images_per_prompt, params.evaluation.num_prompts
    (dog,) = evaluation["subjects"]
    assert (dog["subject"], dog["identifier"], dog["class_noun"]) == ("dog", "sks", "dog")
    assert evaluation["metrics"] == dog["metrics"]  # one subject: its scores are the run's
    assert set(dog["metrics"]) == {"student", "direct", "base", "supervisor"}
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
    assert len(samples) == 4 * n * k
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
    # plots, feature variance, reference photos, then one grid per method and prompt
    assert len(parser.sources) == 3 + 4 * params.evaluation.num_prompts
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
    assert set(dog["variance"]) == set(EVAL_METHODS)
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


def test_a_missing_encoder_folder_fails_before_any_sampling(
    subject_dir, supervisor_dir, student_dir, tmp_path, monkeypatch
):
    import proxytune.stages.evaluate

    missing = tmp_path / "missing"
    settings = RunParams.resolve("tiny", {"evaluation.dino_source": str(missing)}).evaluation
    monkeypatch.setattr(
        proxytune.stages.evaluate, "draw", lambda *a: pytest.fail("sampled before loading encoders")
    )
    with pytest.raises(FileNotFoundError, match=re.escape(f"tiny-dino: no folder '{missing}'")):
        evaluate(subject_dir, supervisor_dir, student_dir, tmp_path / "out", settings, device=CPU)
    assert not (tmp_path / "out").exists()


def _table(lines: list[str]) -> dict[str, list[str]]:
    return {
        cells[0]: cells[1:]
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])
    }


def test_the_comparison_gives_every_method_and_the_students_gains_over_each(evaluation_dir):
    evaluation = read_evaluation(evaluation_dir)
    metrics, keys = evaluation["metrics"], ("clip_i", "clip_t", "dino")
    note, scores, gains, verdict = (evaluation_dir / "comparison.md").read_text().split("\n\n")
    assert note.startswith(
        "> Random-weight models (tiny-clip, tiny-dino, tiny-janus, tiny-sd): these numbers"
    )
    lines = scores.splitlines()
    assert lines[0] == "| method | CLIP-I | CLIP-T | DINO |"
    assert _table(lines) == {
        title: [f"{metrics[method][k]:.4f}" for k in keys]
        for method, title in (
            ("student", "student (proxy-tuned)"),
            ("direct", "direct (tuned on the photos)"),
            ("base", "base (untuned)"),
            ("supervisor", "supervisor (diffusion teacher)"),
        )
    }
    assert gains.splitlines()[0] == "| student vs | CLIP-I | CLIP-T | DINO |"
    expected = {}
    for other in ("direct", "base", "supervisor"):
        cells = []
        for k in keys:
            gain = metrics["student"][k] - metrics[other][k]
            cells.append(f"{gain:+.4f} ({gain / abs(metrics[other][k]):+.2%})")
            assert evaluation["gains"][other][k]["gain"] == pytest.approx(gain, abs=1e-12)
        expected[other] = cells
    assert _table(gains.splitlines()) == expected
    won = sum(metrics["student"][k] > metrics["supervisor"][k] for k in keys)
    assert f"beat the supervisor on {won} of 3 scores" in verdict
    report = (evaluation_dir / "report.html").read_text()
    assert "id=comparison " in report and "id=comparison-gains " in report and "id=verdict" in report
    # tiny encoders: the paper's numbers do not apply
    assert evaluation["reported"] == [] and "paper:" not in report


def test_a_black_box_supervisor_leaves_the_student_alone_in_the_table():
    from proxytune.analysis.report import markdown_table

    alone = markdown_table({"student": {"clip_i": 0.5, "clip_t": 0.25, "dino": 0.4}})
    assert alone == (
        "| method | CLIP-I | CLIP-T | DINO |\n|---|---:|---:|---:|\n"
        "| student (proxy-tuned) | 0.5000 | 0.2500 | 0.4000 |\n\nOnly the student was scored.\n"
    )


def test_the_direct_baseline_is_the_students_lora_trained_on_every_photo(
    direct_dir, student_dir, subject_dir
):
    from proxytune.core.contracts import read_adapter_card

    direct, student = read_adapter_card(direct_dir, "student"), read_adapter_card(student_dir, "student")
    photos = len(load_subject(subject_dir)[1])
    assert direct.params["training_data"] == "photos" and student.params["training_data"] == "proxy"
    assert (direct.params["train_images"], direct.params["heldout_images"]) == (photos, 0)
    assert list(direct.loss_before) == ["train"] and direct.loss_after["train"] < direct.loss_before["train"]
    same = ("backend", "steps", "rank", "alpha", "learning_rate", "batch_size", "seed", "null_prompt_prob")
    assert {k: direct.params[k] for k in same} == {k: student.params[k] for k in same}
    assert direct.base_model == student.base_model and direct.subjects == student.subjects
    assert direct.adapter_sha256 != student.adapter_sha256


def test_the_base_method_samples_the_untuned_model_with_the_same_seeds(evaluation_dir, student_dir, params):
    from proxytune.backends._tuned import load_base_student
    from proxytune.core.contracts import read_adapter_card

    evaluation = read_evaluation(evaluation_dir)
    (dog,) = evaluation["subjects"]
    drawn = {m: [s for s in dog["samples"] if s["model"] == m] for m in ("student", "base")}
    prompts = [s["prompt"] for s in drawn["base"]]
    assert prompts == [s["prompt"] for s in drawn["student"]]  # every method draws the same prompts
    backend = load_base_student(read_adapter_card(student_dir, "student"), CPU)
    sampling = backend.sampling.override(**params.evaluation.student_sampling)
    seeds = [params.evaluation.seed + i for i in range(len(prompts))]
    again = backend.generate(prompts, seeds, sampling, params.evaluation.batch_size)
    changed = []
    for base, student, image in zip(drawn["base"], drawn["student"], again, strict=True):
        with Image.open(evaluation_dir / base["file"]) as saved:
            assert not ImageChops.difference(saved.convert("RGB"), image).getbbox()
        with Image.open(evaluation_dir / student["file"]) as tuned:
            changed.append(ImageChops.difference(tuned.convert("RGB"), image).getbbox() is not None)
    assert any(changed)  # the adapter changes what the same seeds draw
    assert evaluation["methods"]["base"] == {"backend": "tiny-janus", "base_model": "random:tiny-janus"}


def test_reference_photos_are_saved_beside_the_samples(evaluation_dir, subject_dir):
    (dog,) = read_evaluation(evaluation_dir)["subjects"]
    photos = load_subject(subject_dir)[1]
    assert len(dog["references"]) == len(photos)
    for file, photo in zip(dog["references"], photos, strict=True):
        with Image.open(evaluation_dir / file) as saved:
            assert not ImageChops.difference(saved.convert("RGB"), photo.convert("RGB")).getbbox()


def test_direct_in_the_methods_needs_a_matching_baseline_before_any_sampling(
    subject_dir, supervisor_dir, student_dir, tmp_path
):
    settings = RunParams.resolve("tiny", {"evaluation.methods": ["student", "direct"]}).evaluation
    with pytest.raises(ValueError, match="lists direct, but no direct-tuned adapter was given"):
        evaluate(subject_dir, supervisor_dir, student_dir, tmp_path / "out", settings, device=CPU)
    with pytest.raises(ValueError, match="expected a student adapter"):
        evaluate(
            subject_dir,
            supervisor_dir,
            student_dir,
            tmp_path / "out",
            settings,
            device=CPU,
            direct_dir=supervisor_dir,
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        (["supervisor"], "must include student"),
        (["student", "dreambooth"], "unknown method"),
        (["student", "base", "base"], "lists one twice"),
    ],
)
def test_bad_method_lists_are_refused(methods, message):
    with pytest.raises(ValueError, match=message):
        RunParams.resolve("tiny", {"evaluation.methods": methods})


def test_the_papers_numbers_apply_only_to_the_same_encoders_and_models():
    from proxytune.analysis.paper import reported_rows
    from proxytune.analysis.report import markdown_table

    published = {"clip": "clip-vit-b32", "dino": "dino-vits16"}
    rows = reported_rows(["student", "supervisor", "direct"], "lumina-mgpt-7b-768", {"sdxl"}, published)
    assert [(r["label"], r["dino"]) for r in rows] == [
        ("Real images", 0.774),
        ("DreamBooth, SD (full fine-tuning)", 0.668),
        ("Lumina-mGPT tuned directly, LoRA", 0.5088),
        ("SDXL supervisor (DreamBooth-LoRA)", 0.7272),
        ("Lumina-mGPT + Proxy-Tuning (SDXL)", 0.7834),
    ]
    sd35 = reported_rows(["student"], "lumina-mgpt-7b-768", {"sd3.5-large"}, published)
    assert [r["clip_i"] for r in sd35 if r["method"]] == [0.8091]
    janus = reported_rows(["student", "supervisor"], "janus-pro-1b", {"flux-dev"}, published)
    assert [r["method"] for r in janus] == [None, None]  # context rows only
    assert (
        reported_rows(["student"], "lumina-mgpt-7b-768", {"sdxl"}, {**published, "clip": "tiny-clip"}) == []
    )
    table = markdown_table({"student": {"clip_i": 0.8, "clip_t": 0.3, "dino": 0.7}}, rows)
    assert "| paper: Real images (DreamBooth paper via CoAR) | 0.8850 | – | 0.7740 |" in table


def test_the_report_opens_in_a_browser_with_its_table_and_every_picture(evaluation_dir, open_page, tmp_path):
    from browser import screenshot

    opened = open_page(evaluation_dir / "report.html")
    page = opened.page
    rows = page.eval_on_selector_all("#comparison tr", "rows => rows.map(r => r.cells[0].textContent)")
    assert rows == [
        "method",
        "student (proxy-tuned)",
        "supervisor (diffusion teacher)",
        "direct (tuned on the photos)",
        "base (untuned)",
    ]
    versus = page.eval_on_selector_all(
        "#comparison-gains tr td:first-child", "cells => cells.map(c => c.textContent)"
    )
    assert versus == ["supervisor", "direct", "base"]
    assert page.inner_text("#verdict").startswith("The student beat the supervisor on")
    widths = page.eval_on_selector_all("img", "images => images.map(i => i.complete && i.naturalWidth)")
    assert len(widths) == 3 + 4 * 2 and all(widths)  # plots, spread, photos; methods x prompts grids
    opened.assert_no_errors()
    shot = screenshot(page, tmp_path, "report")
    with Image.open(shot) as image:
        assert image.size[0] == 1280 and image.size[1] > 900 and image.getextrema() != ((255, 255),) * 3


def test_random_weight_models_are_named_as_meaningless_everywhere(evaluation_dir):
    from proxytune.analysis.report import random_note

    evaluation = read_evaluation(evaluation_dir)
    assert evaluation["random_weights"] == ["tiny-clip", "tiny-dino", "tiny-janus", "tiny-sd"]
    note = random_note(evaluation)
    assert "test the plumbing, not the method" in note
    assert f"<p class=warn id=random-weights>{note}</p>" in (evaluation_dir / "report.html").read_text()
    assert random_note({"metrics": evaluation["metrics"]}) == ""  # real models: no warning
