import json
from html.parser import HTMLParser

from PIL import Image

from proxytune.evaluate import read_evaluation
from proxytune.metrics import PROTOCOL


class Images(HTMLParser):
    """Collects image sources and every link-like attribute of a page."""

    def __init__(self):
        super().__init__()
        self.sources, self.links = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs["src"])
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
    # plots, reference photos, then one student and one supervisor grid per prompt
    assert len(parser.sources) == 2 + 2 * params.evaluation.num_prompts
    assert all(src.startswith("data:image/png;base64,") for src in parser.sources)
    assert f"{evaluation['metrics']['student']['dino']:.4f}" in page
    assert PROTOCOL in page
    assert "a sks dog in the snow" in page
    # nothing fetched from elsewhere (base64 data may contain "http" by chance, so check links)
    assert all(link.startswith("data:") for link in parser.links)
    assert "url(" not in page and "<script" not in page
