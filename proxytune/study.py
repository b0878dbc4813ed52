"""The paper's user study (supplementary section 3): a blind questionnaire built from
evaluation outputs, and the analysis of the answer files it downloads.

`export_study` picks a balanced set of samples (the same prompts and the same number of
images for every method of a subject), copies them under opaque names and writes one static
page that presents them in an order of each participant's own, so neither file names, page
source nor position tell a participant which method drew an image. The key from item to
method stays beside the questionnaire, with the study owner. `analyze_answers` turns the
downloaded answer files into per-method means with standard errors.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from proxytune.config import EVAL_METHODS
from proxytune.contracts import EVALUATION_FILE
from proxytune.fsutil import (
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    sha256_bytes,
    sha256_file,
    sha256_json,
)

QUESTIONNAIRE = "questionnaire"
KEY_FILE = "key.json"
SCALE = (1, 5)  # Likert scale, both ends included
# (answer field, title, question): the three criteria each generated image is rated on
CRITERIA = (
    (
        "image_quality",
        "Image quality",
        "How good is the generated image as a picture: sharp, coherent, free of artefacts?",
    ),
    (
        "subject_fidelity",
        "Subject fidelity",
        "How closely does the subject in the generated image match the one in the reference photos?",
    ),
    ("prompt_fidelity", "Prompt fidelity", "How well does the generated image follow the prompt?"),
)
CRITERION_KEYS = tuple(key for key, _, _ in CRITERIA)
CSV_COLUMNS = ("method", "criterion", "mean", "sem", "n")


@dataclass(frozen=True)
class StudyInfo:
    """What `export_study` wrote: `page` to publish (with its images), `key` to keep."""

    study: str
    page: Path
    key: Path
    items: int
    methods: tuple[str, ...]
    subjects: tuple[str, ...]
    skipped: dict[str, list[str]]  # method -> subjects without it, so left out of the study


@dataclass(frozen=True)
class StudyRow:
    """One method's ratings on one criterion: mean, standard error (ddof=1) and count."""

    method: str
    criterion: str
    mean: float
    sem: float
    n: int


@dataclass(frozen=True)
class _Subject:
    run: Path
    name: str
    class_noun: str
    identifier: str
    references: list[str]
    samples: dict[str, list[dict]]  # method -> its samples, in evaluation.json's order


@dataclass(frozen=True)
class _Pick:
    subject: _Subject
    method: str
    prompt: str
    file: str


def export_study(
    runs: Sequence[Path],
    out_dir: Path,
    prompts_per_subject: int = 3,
    images_per_method: int = 2,
    methods: Sequence[str] | None = None,
    seed: int = 0,
) -> StudyInfo:
    """Write `out_dir/questionnaire/` (index.html + images/) and `out_dir/key.json` from the
    evaluation folders `runs`: per subject its first `prompts_per_subject` prompts and per
    prompt and method the first `images_per_method` images. `methods` defaults to those every
    subject has; `seed` salts the study id, item ids and image names, so that two studies of
    the same samples share no names. Everything is validated before anything is written."""
    out_dir = Path(out_dir)
    questionnaire, key_path = out_dir / QUESTIONNAIRE, out_dir / KEY_FILE
    if prompts_per_subject < 1 or images_per_method < 1:
        raise ValueError("prompts per subject and images per method must be at least 1")
    if questionnaire.exists() and (not questionnaire.is_dir() or any(questionnaire.iterdir())):
        raise ValueError(
            f"{questionnaire} already exists and is not empty; export each study to a new folder"
        )
    if key_path.exists():
        raise ValueError(f"{key_path} already exists (an earlier study's key); export to a new folder")
    subjects = _load_subjects([Path(run) for run in runs])
    chosen, skipped = _choose_methods(subjects, methods)
    picks = [p for s in subjects for p in _pick(s, chosen, prompts_per_subject, images_per_method)]
    references = [(s, file) for s in subjects for file in s.references]
    content = _hashed([(p.subject, p.file) for p in picks] + references)
    study = sha256_json(
        {
            "seed": seed,
            "items": [[p.subject.name, p.method, p.prompt, content[p.subject.run, p.file]] for p in picks],
            "references": [[s.name, content[s.run, file]] for s, file in references],
        }
    )[:12]

    def image(run: Path, file: str) -> str:
        return sha256_bytes(f"{study}:image:{content[run, file]}".encode())[:16] + ".png"

    items, key_items = [], {}
    for p in picks:
        item_id = sha256_bytes(f"{study}:item:{p.subject.name}:{p.file}".encode())[:12]
        items.append(
            {
                "id": item_id,
                "image": image(p.subject.run, p.file),
                "prompt": _readable(p.prompt, p.subject.identifier),
                "noun": p.subject.class_noun,
                "references": [image(p.subject.run, file) for file in p.subject.references],
            }
        )
        key_items[item_id] = {
            "method": p.method,
            "subject": p.subject.name,
            "prompt": p.prompt,
            "run": str(p.subject.run.resolve()),
            "file": p.file,
            "image": image(p.subject.run, p.file),
        }
    items.sort(key=lambda item: item["id"])  # the page's own order says nothing about methods
    key = {
        "study": study,
        "seed": seed,
        "methods": list(chosen),
        "criteria": list(CRITERION_KEYS),
        "scale": list(SCALE),
        "skipped": skipped,
        "runs": [str(Path(run).resolve()) for run in runs],
        "items": key_items,
    }
    with atomic_directory(questionnaire) as tmp:
        (tmp / "images").mkdir()
        for run, file in content:
            shutil.copyfile(run / file, tmp / "images" / image(run, file))
        (tmp / "index.html").write_text(_page(study, items), encoding="utf-8")
        atomic_write_json(key_path, key)  # before the rename: a questionnaire never lacks its key
    return StudyInfo(
        study=study,
        page=questionnaire / "index.html",
        key=key_path,
        items=len(items),
        methods=tuple(chosen),
        subjects=tuple(s.name for s in subjects),
        skipped=skipped,
    )


def analyze_answers(answer_files: Sequence[Path], key_file: Path) -> list[StudyRow]:
    """Per method and criterion, the mean rating, its standard error (sample std / sqrt(n),
    ratings taken as independent) and the number of ratings, over every answer file. Files
    from another study, with items the key lacks, incomplete, or a participant's second file
    are refused, naming the file: a study's numbers come from its own complete answers only."""
    if not answer_files:
        raise ValueError("give at least one answers file")
    key = _read_json(Path(key_file), "key")
    if not isinstance(key, dict) or "study" not in key or "items" not in key:
        raise ValueError(f"{key_file}: not a study key (no 'study' and 'items')")
    items: dict[str, dict] = key["items"]
    ratings: dict[tuple[str, str], list[int]] = {(m, c): [] for m in key["methods"] for c in CRITERION_KEYS}
    participants: dict[str, Path] = {}
    for path in map(Path, answer_files):
        answers = _read_json(path, "answers file")
        if not isinstance(answers, dict) or not isinstance(answers.get("answers"), list):
            raise ValueError(f"{path}: not an answers file (no 'answers' list)")
        if answers.get("study") != key["study"]:
            raise ValueError(
                f"{path}: answers to study {answers.get('study')!r}, not {key['study']!r} of {key_file}"
            )
        participant = answers.get("participant")
        if not isinstance(participant, str) or not participant.strip():
            raise ValueError(f"{path}: no participant id")
        if participant in participants:
            raise ValueError(
                f"participant {participant!r} answered twice: {participants[participant]} and {path}"
            )
        participants[participant] = path
        for item, scores in _validated(path, answers["answers"], items).items():
            for criterion, score in scores.items():
                ratings[items[item]["method"], criterion].append(score)
    rows = []
    for (method, criterion), values in ratings.items():
        n = len(values)
        sem = statistics.stdev(values) / math.sqrt(n) if n > 1 else math.nan
        rows.append(StudyRow(method, criterion, statistics.fmean(values) if values else math.nan, sem, n))
    return rows


def write_rows_csv(rows: Sequence[StudyRow], path: Path) -> None:
    """The analysis as CSV (method, criterion, mean, sem, n), one row per method and criterion."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([row.method, row.criterion, repr(row.mean), repr(row.sem), row.n])
    atomic_write_text(path, text.getvalue())


def _read_json(path: Path, what: str) -> object:
    if not path.is_file():
        raise ValueError(f"{path}: no such {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not JSON ({error})") from None


def _validated(path: Path, answers: list, items: dict[str, dict]) -> dict[str, dict[str, int]]:
    """One file's ratings by item, each criterion an integer on the scale, every item once."""
    low, high = SCALE
    rated: dict[str, dict[str, int]] = {}
    for answer in answers:
        item = answer.get("item") if isinstance(answer, dict) else None
        if item not in items:
            raise ValueError(f"{path}: unknown item {item!r}, not in this study's key")
        if item in rated:
            raise ValueError(f"{path}: item {item!r} answered twice")
        scores = {c: answer.get(c) for c in CRITERION_KEYS}
        for criterion, score in scores.items():
            if type(score) is not int or not low <= score <= high:
                raise ValueError(
                    f"{path}: item {item!r} {criterion} is {score!r}, not an integer {low}-{high}"
                )
        rated[item] = scores
    if len(rated) != len(items):
        raise ValueError(f"{path}: {len(rated)} of the study's {len(items)} items answered; incomplete")
    return rated


def _hashed(files: list[tuple[_Subject, str]]) -> dict[tuple[Path, str], str]:
    """The content hash of each (run, file) used, all checked present before any is hashed."""
    for subject, file in files:
        if not (subject.run / file).is_file():
            raise ValueError(f"{subject.run}: {file}, listed in {EVALUATION_FILE}, is missing")
    return {(s.run, file): sha256_file(s.run / file) for s, file in files}


def _load_subjects(runs: list[Path]) -> list[_Subject]:
    if not runs:
        raise ValueError("give at least one evaluation folder")
    subjects: dict[str, _Subject] = {}
    for run in runs:
        evaluation = run / EVALUATION_FILE
        if not evaluation.is_file():
            raise ValueError(f"{run}: no {EVALUATION_FILE}; give evaluation output folders")
        data = _read_json(evaluation, EVALUATION_FILE)
        if not isinstance(data, dict) or not isinstance(data.get("subjects"), list):
            raise ValueError(f"{evaluation}: no 'subjects' list")
        for entry in data["subjects"]:
            try:
                subject = _subject(run, entry)
            except (KeyError, TypeError, AttributeError) as error:
                raise ValueError(
                    f"{evaluation}: malformed subject entry ({type(error).__name__}: {error})"
                ) from None
            if subject.name in subjects:
                raise ValueError(
                    f"subject {subject.name!r} is in two runs: {subjects[subject.name].run} and {run}"
                )
            subjects[subject.name] = subject
    return list(subjects.values())


def _subject(run: Path, entry: dict) -> _Subject:
    samples: dict[str, list[dict]] = {}
    for sample in entry["samples"]:
        if not {"model", "file", "prompt"} <= sample.keys():
            raise KeyError(f"a sample without 'model', 'file' or 'prompt': {sample}")
        samples.setdefault(sample["model"], []).append(sample)
    if not entry["references"]:
        raise ValueError(f"{run}: subject {entry['subject']!r} has no reference photos")
    return _Subject(
        run, entry["subject"], entry["class_noun"], entry["identifier"], list(entry["references"]), samples
    )


def _choose_methods(
    subjects: list[_Subject], methods: Sequence[str] | None
) -> tuple[list[str], dict[str, list[str]]]:
    """The study's methods (named ones, or those every subject has: a method rated on only some
    subjects would not compare with the others) and the methods left out, with the subjects
    that lack them."""
    present = {m for s in subjects for m in s.samples}
    skipped: dict[str, list[str]] = {}
    if methods is None:
        chosen = [m for m in present if all(m in s.samples for s in subjects)]
        for method in sorted(present - set(chosen)):
            skipped[method] = [s.name for s in subjects if method not in s.samples]
    else:
        chosen = list(dict.fromkeys(methods))
        for method in chosen:
            lacking = [f"{s.name} ({s.run})" for s in subjects if method not in s.samples]
            if lacking:
                raise ValueError(f"method {method!r} has no samples for subject(s) {', '.join(lacking)}")
    chosen.sort(key=lambda m: (EVAL_METHODS.index(m) if m in EVAL_METHODS else len(EVAL_METHODS), m))
    if len(chosen) < 2:
        raise ValueError(
            f"a study compares at least 2 methods; every subject has only {chosen or 'none'}"
            if methods is None
            else f"a study compares at least 2 methods; --methods gives {chosen or 'none'}"
        )
    return chosen, skipped


def _pick(subject: _Subject, methods: list[str], prompts: int, images: int) -> list[_Pick]:
    """The subject's first `prompts` distinct prompts (in sample order) and, per prompt and
    method, its first `images` samples."""
    order = list(dict.fromkeys(s["prompt"] for m in methods for s in subject.samples[m]))
    if len(order) < prompts:
        raise ValueError(f"subject {subject.name!r} ({subject.run}) has {len(order)} prompts, not {prompts}")
    picks = []
    for prompt in order[:prompts]:
        for method in methods:
            files = [s["file"] for s in subject.samples[method] if s["prompt"] == prompt][:images]
            if len(files) < images:
                raise ValueError(
                    f"subject {subject.name!r} ({subject.run}): {method} has {len(files)} images "
                    f"for {prompt!r}, not {images}"
                )
            picks.extend(_Pick(subject, method, prompt, file) for file in files)
    return picks


def _readable(prompt: str, identifier: str) -> str:
    """The prompt without the rare-token identifier, which means nothing to a participant
    ("a sks dog in the snow" -> "a dog in the snow"), as CLIP-T scores it."""
    if not identifier:
        return prompt
    return re.sub(r"\s+", " ", re.sub(rf"\b{re.escape(identifier)}\b", "", prompt)).strip()


def _page(study: str, items: list[dict]) -> str:
    data = {
        "study": study,
        "scale": list(SCALE),
        "criteria": [{"key": k, "title": t, "question": q} for k, t, q in CRITERIA],
        "items": items,
    }
    # `</` cannot end the script element early, whatever a prompt holds
    embedded = json.dumps(data, indent=1).replace("</", "<\\/")
    return PAGE.replace("__COUNT__", str(len(items))).replace("__DATA__", embedded)


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>Image rating study</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 60rem; padding: 0 1rem 4rem;
         color: #1b1b1b; line-height: 1.45; }
  header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ccc; padding: .5rem 0;
           z-index: 1; }
  h1 { font-size: 1.4rem; margin: .5rem 0; }
  .item { border: 1px solid #bbb; border-radius: 6px; padding: 1rem; margin: 1.5rem 0; }
  .item.missing { border-color: #b00020; box-shadow: 0 0 0 2px #b0002033; }
  .item h2 { font-size: 1.1rem; margin: 0 0 .5rem; }
  .view { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }
  .refs { display: flex; flex-wrap: wrap; gap: .5rem; max-width: 250px; }
  .refs h3 { font-size: .95rem; margin: 0; width: 100%; }
  .refs img { width: 120px; height: 120px; object-fit: cover; border-radius: 4px; }
  figure { margin: 0; flex: 0 1 384px; }
  figure img { width: 100%; height: auto; border-radius: 4px; }
  figcaption { font-size: 1.05rem; }
  fieldset { border: 1px solid #ddd; border-radius: 4px; margin: .5rem 0; }
  legend span { font-weight: 600; }
  .scale { display: flex; flex-wrap: wrap; gap: .25rem 1rem; }
  .scale label { display: inline-flex; align-items: center; gap: .3rem; padding: .2rem .4rem;
                 cursor: pointer; }
  input[type=radio] { width: 1.1rem; height: 1.1rem; }
  input, button { font: inherit; }
  button { padding: .3rem 1rem; }
  #message { font-weight: 600; }
  #message.error { color: #b00020; }
  #message.done { color: #1b5e20; }
  :focus-visible { outline: 3px solid #1a5fb4; outline-offset: 2px; }
</style>
</head>
<body>
<header>
  <h1>Image rating study</h1>
  <p id="progress" aria-live="polite">__COUNT__ images to rate.</p>
</header>
<main>
  <section aria-labelledby="intro-title">
    <h2 id="intro-title">Instructions</h2>
    <p>Each of the __COUNT__ images below was generated by a computer from a short text (the prompt)
      to show one particular subject, which you can see in the reference photos next to it. Rate every
      image on three criteria, from 1 (very poor) to 5 (excellent). There are no right answers: give
      your own impression.</p>
    <p>Answers are saved in this browser as you go; opening this page again with the same participant
      id brings them back. When every image is rated, press <strong>Download answers</strong> and send
      the file to the person who gave you this page.</p>
    <form id="start">
      <label for="participant">Participant id</label>
      <input id="participant" name="participant" autocomplete="off" aria-required="true">
      <button type="submit" id="begin">Start</button>
      <p id="start-message" role="alert"></p>
    </form>
  </section>
  <div id="study" hidden>
    <div id="items"></div>
    <p><button type="button" id="download">Download answers</button></p>
    <p id="message" role="alert"></p>
  </div>
</main>
<script type="application/json" id="study-data">
__DATA__
</script>
<script>
"use strict";
const study = JSON.parse(document.getElementById("study-data").textContent);
const scaleWords = {1: "very poor", 2: "poor", 3: "fair", 4: "good", 5: "excellent"};
let participant = null;
let order = [];
let answers = {};

// FNV-1a over the UTF-8 bytes: a 32-bit seed from the participant id.
function seedOf(text) {
  let hash = 0x811c9dc5;
  for (const byte of new TextEncoder().encode(text)) {
    hash = Math.imul(hash ^ byte, 0x01000193) >>> 0;
  }
  return hash;
}

// mulberry32: small, fast and the same in every browser, so an id always gives one order.
function generator(seed) {
  let state = seed >>> 0;
  return function () {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function shuffled(list, seed) {
  const out = list.slice();
  const random = generator(seed);
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

function storageKey() {
  return "rating-study:" + study.study + ":" + participant;
}

function save() {
  try {
    localStorage.setItem(storageKey(), JSON.stringify(answers));
  } catch (error) {
    // no storage (private mode, some file:// set-ups): answers live until the page closes
  }
}

function restore() {
  try {
    return JSON.parse(localStorage.getItem(storageKey()) || "{}");
  } catch (error) {
    return {};
  }
}

function element(tag, attributes, text) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function itemSection(item, position) {
  const number = position + 1;
  const section = element("section", {"class": "item", "data-item": item.id,
                                      "aria-labelledby": "title-" + item.id});
  section.append(element("h2", {"id": "title-" + item.id}, "Image " + number + " of " + order.length));
  const refs = element("div", {"class": "refs"});
  refs.append(element("h3", {}, "Reference photos of the " + item.noun));
  item.references.forEach((name, i) => refs.append(element("img", {
    "src": "images/" + name, "alt": "Reference photo " + (i + 1) + " of the " + item.noun})));
  const view = element("div", {"class": "view"});
  view.append(refs);
  const figure = element("figure");
  figure.append(element("img", {"src": "images/" + item.image, "class": "sample",
                                "alt": "Generated image " + number}));
  const caption = element("figcaption", {}, "Prompt: ");
  caption.append(element("q", {}, item.prompt));
  figure.append(caption);
  view.append(figure);
  section.append(view);
  for (const criterion of study.criteria) {
    const fieldset = element("fieldset", {"data-criterion": criterion.key});
    const legend = element("legend");
    legend.append(element("span", {}, criterion.title + ": "), criterion.question);
    fieldset.append(legend);
    const scale = element("div", {"class": "scale"});
    for (let value = study.scale[0]; value <= study.scale[1]; value++) {
      const id = item.id + "-" + criterion.key + "-" + value;
      const input = element("input", {"type": "radio", "id": id, "value": String(value),
                                      "name": item.id + ":" + criterion.key});
      if ((answers[item.id] || {})[criterion.key] === value) input.checked = true;
      const label = element("label", {"for": id});
      label.append(input, value + " (" + scaleWords[value] + ")");
      scale.append(label);
    }
    fieldset.append(scale);
    section.append(fieldset);
  }
  return section;
}

function complete(item) {
  return study.criteria.every((criterion) => (answers[item.id] || {})[criterion.key] !== undefined);
}

function showProgress() {
  const done = order.filter(complete).length;
  document.getElementById("progress").textContent =
    "Participant " + participant + ": " + done + " of " + order.length + " images rated.";
}

function start(event) {
  event.preventDefault();
  const field = document.getElementById("participant");
  const id = field.value.trim();
  if (!id) {
    document.getElementById("start-message").textContent = "Please enter your participant id first.";
    field.focus();
    return;
  }
  participant = id;
  field.readOnly = true;
  document.getElementById("begin").disabled = true;
  document.getElementById("start-message").textContent = "";
  answers = restore();
  order = shuffled(study.items, seedOf(study.study + "\\n" + participant));
  const list = document.getElementById("items");
  list.replaceChildren(...order.map(itemSection));
  document.getElementById("study").hidden = false;
  showProgress();
}

function record(event) {
  const input = event.target;
  if (input.type !== "radio") return;
  const [item, criterion] = input.name.split(":");
  answers[item] = Object.assign(answers[item] || {}, {[criterion]: Number(input.value)});
  input.closest(".item").classList.toggle("missing", false);
  save();
  showProgress();
}

function download() {
  const message = document.getElementById("message");
  const missing = order.filter((item) => !complete(item));
  document.querySelectorAll(".item").forEach((node) => {
    node.classList.toggle("missing", missing.some((item) => item.id === node.dataset.item));
  });
  if (missing.length) {
    const first = order.indexOf(missing[0]) + 1;
    message.className = "error";
    message.textContent = "Not yet: " + missing.length + " of " + order.length +
      " images still need a rating on every criterion (the first is image " + first + ").";
    return;
  }
  const payload = {
    participant: participant,
    study: study.study,
    answers: order.map((item) => Object.assign({item: item.id}, answers[item.id])),
  };
  const blob = new Blob([JSON.stringify(payload, null, 2)], {type: "application/json"});
  const url = URL.createObjectURL(blob);
  const link = element("a", {"href": url,
    "download": "answers-" + study.study + "-" + participant.replace(/[^A-Za-z0-9_-]+/g, "_") + ".json"});
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  message.className = "done";
  message.textContent = "Answers downloaded. Please send that file to the person who gave you this page.";
}

document.getElementById("start").addEventListener("submit", start);
document.getElementById("items").addEventListener("change", record);
document.getElementById("download").addEventListener("click", download);
</script>
</body>
</html>
"""
