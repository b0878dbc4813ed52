"""The user-study kit on synthetic evaluation folders: a blind, balanced export; the
questionnaire in headless Chromium (images load, per-participant order, answers only when
complete, a real download); the analysis of those answers; the errors; the CLI."""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from browser import REQUIRE_ENV, browser_unavailable, chromium_executable, screenshot
from PIL import Image

from proxytune.analysis.study import CRITERION_KEYS, analyze_answers, export_study, write_rows_csv
from proxytune.cli import main

METHODS = ("student", "supervisor", "direct", "base")
TEMPLATES = ("a {} {} in the snow", "a {} {} on the beach", "a red {} {}")
IMAGES_PER_PROMPT = 3
REFERENCES = 3
IDENTIFIERS = {"dog": "sks", "cat": "ohwx", "teapot": "zwx"}
PROMPTS, IMAGES = 2, 2  # the browser study: 3 subjects x 2 prompts x 4 methods x 2 images
ITEMS = len(IDENTIFIERS) * PROMPTS * len(METHODS) * IMAGES
# participant p1's ratings per method (image quality, subject fidelity, prompt fidelity);
# p2 rates a subject one lower (dog), the same (cat) or one higher (teapot), within 1-5
RATINGS = {"student": (5, 4, 3), "supervisor": (2, 3, 4), "direct": (3, 2, 2), "base": (1, 1, 2)}
SHIFT = {"p1": {"dog": 0, "cat": 0, "teapot": 0}, "p2": {"dog": -1, "cat": 0, "teapot": 1}}


def make_run(root: Path, subjects: dict[str, tuple[str, ...]], seed: int) -> Path:
    """An evaluation folder as `proxytune.stages.evaluate` writes it: random PNGs, evaluation.json."""
    rng = np.random.default_rng(seed)

    def png(file: str) -> None:
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / file)

    entries = []
    for name, methods in subjects.items():
        identifier = IDENTIFIERS[name]
        prompts = [t.format(identifier, name) for t in TEMPLATES for _ in range(IMAGES_PER_PROMPT)]
        samples = []
        for method in methods:
            for index, prompt in enumerate(prompts):
                samples.append(
                    {
                        "model": method,
                        "index": index,
                        "file": f"{name}/{method}/{index:03d}.png",
                        "prompt": prompt,
                    }
                )
                png(samples[-1]["file"])
        references = [f"{name}/reference/{i:02d}.png" for i in range(REFERENCES)]
        for file in references:
            png(file)
        per_prompt = {
            m: [{"prompt": t.format("{identifier}", name), "clip_i": 0.5} for t in TEMPLATES] for m in methods
        }
        entries.append(
            {
                "subject": name,
                "class_noun": name,
                "identifier": identifier,
                "samples": samples,
                "references": references,
                "per_prompt": per_prompt,
            }
        )
    (root / "evaluation.json").write_text(json.dumps({"subjects": entries}))
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    return [
        make_run(root / "a", {"dog": METHODS, "cat": METHODS}, 0),
        make_run(root / "b", {"teapot": METHODS}, 1),
    ]


@pytest.fixture(scope="module")
def study(runs, tmp_path_factory):
    return export_study(
        runs, tmp_path_factory.mktemp("study"), prompts_per_subject=PROMPTS, images_per_method=IMAGES
    )


def key_of(study) -> dict:
    return json.loads(study.key.read_text())


def page_data(study) -> dict:
    html = study.page.read_text()
    return json.loads(re.search(r'id="study-data">(.*?)</script>', html, re.S).group(1))


def rating(participant: str, entry: dict, criterion: int) -> int:
    return min(5, max(1, RATINGS[entry["method"]][criterion] + SHIFT[participant][entry["subject"]]))


def test_export_is_blind_balanced_and_self_contained(study, runs):
    key = key_of(study)
    html = study.page.read_text()
    images = sorted(p.name for p in (study.page.parent / "images").iterdir())
    assert study.items == len(key["items"]) == ITEMS
    assert study.methods == METHODS and study.skipped == {}
    assert study.key.parent == study.page.parent.parent  # the key is not published
    for method in METHODS:
        assert method not in html.lower()
        assert not [name for name in images if method in name]
    assert all(re.fullmatch(r"[0-9a-f]{16}\.png", name) for name in images)
    assert len(images) == ITEMS + len(IDENTIFIERS) * REFERENCES
    assert not re.search(r"https?://|<link|@import", html)

    picked = Counter((e["subject"], e["method"], e["prompt"]) for e in key["items"].values())
    expected = {
        (name, method, t.format(identifier, name))
        for name, identifier in IDENTIFIERS.items()
        for method in METHODS
        for t in TEMPLATES[:PROMPTS]
    }
    assert set(picked) == expected and set(picked.values()) == {IMAGES}
    # the first images of each prompt: 000, 001 (first prompt), 003, 004 (second)
    assert {Path(e["file"]).name for e in key["items"].values()} == {
        "000.png",
        "001.png",
        "003.png",
        "004.png",
    }
    for entry in key["items"].values():
        copy = study.page.parent / "images" / entry["image"]
        assert copy.read_bytes() == (Path(entry["run"]) / entry["file"]).read_bytes()

    data = page_data(study)
    assert data["study"] == key["study"] == study.study
    assert {item["id"] for item in data["items"]} == set(key["items"])
    assert {item["prompt"] for item in data["items"]} >= {"a dog in the snow", "a teapot on the beach"}


def test_seed_renames_everything(study, runs, tmp_path):
    other = export_study(runs, tmp_path, prompts_per_subject=PROMPTS, images_per_method=IMAGES, seed=1)
    assert other.study != study.study
    assert not set(key_of(other)["items"]) & set(key_of(study)["items"])
    names = {p.name for p in (study.page.parent / "images").iterdir()}
    assert not {p.name for p in (other.page.parent / "images").iterdir()} & names


def start(page, participant: str) -> list[str]:
    """Enter the participant id, start, wait for every image; the items in page order."""
    page.fill("#participant", participant)
    page.click("#begin")
    page.wait_for_function("() => Array.from(document.images).every((image) => image.complete)")
    return page.eval_on_selector_all(".item", "nodes => nodes.map((node) => node.dataset.item)")


def fill(page, key: dict, participant: str, skip: tuple[str, str] | None = None) -> None:
    for item, entry in key["items"].items():
        for c, criterion in enumerate(CRITERION_KEYS):
            if (item, criterion) != skip:
                page.check(f'input[name="{item}:{criterion}"][value="{rating(participant, entry, c)}"]')


def test_questionnaire_loads_and_shuffles_per_participant(study, open_page, tmp_path):
    key = key_of(study)
    opened = open_page(study.page)
    page = opened.page
    page.click("#begin")  # no id yet
    assert "participant id" in page.inner_text("#start-message")
    assert page.is_hidden("#study")

    order = start(page, "alice")
    assert sorted(order) == sorted(key["items"])
    loaded = page.evaluate("Array.from(document.images).map((image) => [image.alt, image.naturalWidth])")
    assert len(loaded) == ITEMS * (1 + REFERENCES)
    assert all(alt and width > 0 for alt, width in loaded), loaded
    structure = page.evaluate(
        """() => ({
            fieldsets: document.querySelectorAll(".item fieldset").length,
            legends: Array.from(document.querySelectorAll("legend")).filter((l) => l.textContent).length,
            radios: document.querySelectorAll("input[type=radio]").length,
            labels: Array.from(document.querySelectorAll("input"), (input) => input.labels.length),
        })"""
    )
    assert structure["fieldsets"] == structure["legends"] == ITEMS * len(CRITERION_KEYS)
    assert structure["radios"] == ITEMS * len(CRITERION_KEYS) * 5
    assert set(structure["labels"]) == {1}  # the id field and every radio: one label each
    prompt = page.inner_text(f'.item[data-item="{order[0]}"] figcaption')
    assert (
        key["items"][order[0]]["prompt"].replace(IDENTIFIERS[key["items"][order[0]]["subject"]] + " ", "")
        in prompt
    )
    shot = screenshot(page, tmp_path, "questionnaire")
    assert shot.stat().st_size > 1000 and shot.read_bytes().startswith(b"\x89PNG")
    opened.assert_no_errors()

    orders = {}
    for participant in ("bob", "alice"):
        again = open_page(study.page)
        orders[participant] = start(again.page, participant)
        again.assert_no_errors()
    assert orders["alice"] == order
    assert orders["bob"] != order and sorted(orders["bob"]) == sorted(order)


def test_answers_download_only_when_complete_and_analyze_exactly(study, open_page, tmp_path):
    key = key_of(study)
    files = []
    for participant in ("p1", "p2"):
        opened = open_page(study.page)
        page = opened.page
        downloads = []
        page.on("download", lambda download, seen=downloads: seen.append(download))
        order = start(page, participant)
        page.click("#download")
        assert f"{ITEMS} of {ITEMS} images still need" in page.inner_text("#message")
        assert page.is_visible("#message")
        last = order[-1]
        fill(page, key, participant, skip=(last, "prompt_fidelity"))
        page.click("#download")
        assert f"1 of {ITEMS} images still need" in page.inner_text("#message")
        assert f"image {ITEMS})" in page.inner_text("#message")
        assert page.get_attribute(f'.item[data-item="{last}"]', "class") == "item missing"

        page.reload()  # answers survive in the browser's storage
        assert start(page, participant) == order
        assert f"{ITEMS - 1} of {ITEMS} images rated" in page.inner_text("#progress")
        entry = key["items"][last]
        page.check(f'input[name="{last}:prompt_fidelity"][value="{rating(participant, entry, 2)}"]')
        with page.expect_download() as download:
            page.click("#download")
        path = tmp_path / download.value.suggested_filename
        download.value.save_as(path)
        assert len(downloads) == 1  # the refused clicks downloaded nothing
        assert "downloaded" in page.inner_text("#message")
        opened.assert_no_errors()
        answers = json.loads(path.read_text())
        assert answers["participant"] == participant and answers["study"] == study.study
        assert [a["item"] for a in answers["answers"]] == order
        files.append(path)

    rows = analyze_answers(files, study.key)
    assert [(r.method, r.criterion) for r in rows] == [(m, c) for m in METHODS for c in CRITERION_KEYS]
    for row in rows:
        c = CRITERION_KEYS.index(row.criterion)
        values = np.array(
            [
                rating(p, e, c)
                for p in ("p1", "p2")
                for e in key["items"].values()
                if e["method"] == row.method
            ]
        )
        assert row.n == len(values) == 2 * ITEMS // len(METHODS)
        assert row.mean == pytest.approx(values.mean(), rel=1e-12)
        assert row.sem == pytest.approx(values.std(ddof=1) / np.sqrt(len(values)), rel=1e-12)
    # by hand: student image quality is 5 from p1 (12 images) and 4, 5, 5 (dog, cat, teapot) from p2
    first = rows[0]
    assert first.mean == pytest.approx(29 / 6) and first.sem == pytest.approx(math.sqrt(10 / 69 / 24))


def answers_file(path: Path, key: dict, participant: str, score: int = 3, **changes) -> Path:
    """A participant's answers written by hand, every item rated `score`; `changes` override."""
    answers = [{"item": item, **dict.fromkeys(CRITERION_KEYS, score)} for item in key["items"]]
    data = {"participant": participant, "study": key["study"], "answers": answers, **changes}
    path.write_text(json.dumps(data))
    return path


def test_analysis_means_standard_errors_and_csv(study, tmp_path):
    key = key_of(study)
    files = [answers_file(tmp_path / "a.json", key, "a", 3), answers_file(tmp_path / "b.json", key, "b", 5)]
    rows = analyze_answers(files, study.key)
    assert len(rows) == len(METHODS) * len(CRITERION_KEYS)
    for row in rows:  # 24 ratings, half 3 and half 5: std sqrt(24/23), over sqrt(24)
        assert (row.mean, row.n) == (4.0, 24) and row.sem == pytest.approx(1 / math.sqrt(23))
    assert {r.sem for r in analyze_answers(files[:1], study.key)} == {0.0}

    write_rows_csv(rows, tmp_path / "study.csv")
    with open(tmp_path / "study.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["method", "criterion", "mean", "sem", "n"]
    assert (table[0]["method"], table[0]["criterion"], float(table[0]["mean"]), table[0]["n"]) == (
        "student",
        "image_quality",
        4.0,
        "24",
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"study": "0123456789ab"}, "answers to study '0123456789ab'"),
        ({"answers": [{"item": "feedfeedfeed", "image_quality": 3}]}, "unknown item 'feedfeedfeed'"),
        ({"answers": []}, "0 of the study's 48 items answered"),
        ({"participant": " "}, "no participant id"),
    ],
)
def test_analysis_refuses_foreign_or_broken_answers(study, tmp_path, changes, message):
    bad = answers_file(tmp_path / "bad.json", key_of(study), **{"participant": "p", **changes})
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        analyze_answers([bad], study.key)
    assert str(bad) in str(error.value)


@pytest.mark.parametrize("score", [0, 6, "5", True, 2.5])
def test_analysis_refuses_ratings_off_the_scale(study, tmp_path, score):
    key = key_of(study)
    bad = answers_file(tmp_path / "bad.json", key, "p")
    data = json.loads(bad.read_text())
    data["answers"][-1]["subject_fidelity"] = score
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"subject_fidelity is .*, not an integer 1-5"):
        analyze_answers([bad], study.key)


def test_analysis_refuses_a_participant_twice(study, tmp_path):
    key = key_of(study)
    first, second = answers_file(tmp_path / "1.json", key, "p"), answers_file(tmp_path / "2.json", key, "p")
    with pytest.raises(ValueError, match=f"participant 'p' answered twice: {re.escape(str(first))} and"):
        analyze_answers([first, second], study.key)


def test_export_refuses_bad_input_before_writing(runs, tmp_path):
    def refused(message: str, runs=runs, **options) -> None:
        out = tmp_path / "out"
        with pytest.raises(ValueError, match=message):
            export_study(runs, out, **{"prompts_per_subject": 1, "images_per_method": 1, **options})
        assert not (out / "questionnaire").exists() or not any((out / "questionnaire").iterdir())
        assert not (out / "key.json").exists()

    refused("no evaluation.json", runs=[*runs, tmp_path / "empty"])
    refused("subject 'dog' is in two runs", runs=[runs[0], runs[0]])
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "evaluation.json").write_text(json.dumps({"subjects": [{"subject": "dog"}]}))
    refused(r"odd/evaluation\.json: malformed subject entry \(KeyError: 'samples'\)", runs=[tmp_path / "odd"])
    refused("at least 2 methods; --methods gives", methods=["student"])
    refused("method 'tuned' has no samples for subject", methods=["student", "tuned"])
    refused("has 3 prompts, not 4", prompts_per_subject=4)
    refused("has 3 images for 'a sks dog in the snow', not 4", images_per_method=4)

    broken = make_run(tmp_path / "broken", {"dog": ("student", "base")}, 2)
    (broken / "dog/base/002.png").unlink()  # not picked, so not needed
    (broken / "dog/reference/01.png").unlink()
    refused(
        r"dog/reference/01\.png, listed in evaluation\.json, is missing", runs=[broken], images_per_method=2
    )
    (broken / "dog/base/000.png").unlink()
    refused(r"dog/base/000\.png, listed in evaluation\.json, is missing", runs=[broken])

    (tmp_path / "out" / "questionnaire").mkdir(parents=True)
    (tmp_path / "out" / "questionnaire" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        export_study(runs, tmp_path / "out")


def test_export_leaves_out_a_method_some_subject_lacks(runs, tmp_path):
    partial = make_run(tmp_path / "c", {"teapot": ("student", "direct", "base")}, 3)
    info = export_study([runs[0], partial], tmp_path / "out", prompts_per_subject=1, images_per_method=1)
    assert info.methods == ("student", "direct", "base")
    assert info.skipped == {"supervisor": ["teapot"]}
    assert info.items == 3 * 3
    with pytest.raises(ValueError, match=r"method 'supervisor' has no samples for subject\(s\) teapot"):
        export_study([runs[0], partial], tmp_path / "other", methods=["student", "supervisor"])
    lone = make_run(tmp_path / "d", {"cat": ("student",)}, 4)
    with pytest.raises(ValueError, match=r"at least 2 methods; every subject has only \['student'\]"):
        export_study([lone], tmp_path / "third")


def test_cli_exports_and_analyzes(runs, tmp_path, capsys):
    out = tmp_path / "study"
    export = ["study", "export", *map(str, runs), "--out", str(out), "--prompts", "1", "--images", "1"]
    assert main([*export, "--methods", "student,base", "--seed", "7"]) == 0
    key = json.loads((out / "key.json").read_text())
    assert key["methods"] == ["student", "base"] and key["seed"] == 7
    assert (out / "questionnaire" / "index.html").is_file() and len(key["items"]) == 3 * 2
    assert key["study"] in capsys.readouterr().out

    assert main(export) == 2
    assert "not empty" in capsys.readouterr().out
    assert main([*export[:-6], "--out", str(tmp_path / "other"), "--methods", "student"]) == 2
    assert "at least 2 methods" in capsys.readouterr().out

    answers = [answers_file(tmp_path / f"{p}.json", key, p, score) for p, score in (("a", 2), ("b", 4))]
    analyze = ["study", "analyze", *map(str, answers), "--key", str(out / "key.json")]
    assert main([*analyze, "--csv", str(tmp_path / "study.csv")]) == 0
    printed = capsys.readouterr().out
    assert "student" in printed and "3.00 ± 0.45" in printed  # 2, 2, 2, 4, 4, 4: sd 1.095, / sqrt(6)
    assert len((tmp_path / "study.csv").read_text().splitlines()) == 1 + 2 * len(CRITERION_KEYS)
    foreign = answers_file(tmp_path / "c.json", key, "c", study="ffffffffffff")
    assert main([*analyze[:2], str(foreign), "--key", str(out / "key.json")]) == 2
    error = capsys.readouterr().out
    assert "answers to study 'ffffffffffff'" in error and len(error.strip().splitlines()) == 1


def test_browser_tests_skip_without_chromium_unless_required(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert chromium_executable() is None
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no Chromium"):
        browser_unavailable("no Chromium")
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_ENV}=1 requires"):
        browser_unavailable("no Chromium")
