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
from importlib import resources
from pathlib import Path

from proxytune.core.contracts import EVALUATION_FILE
from proxytune.core.fsutil import (
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    sha256_bytes,
    sha256_file,
    sha256_json,
)
from proxytune.core.params import EVAL_METHODS

QUESTIONNAIRE = "questionnaire"
KEY_FILE = "key.json"
PAGE_TEMPLATE = "study_page.html"  # the questionnaire: __COUNT__ and __DATA__ filled in
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
    page = resources.files(__package__).joinpath(PAGE_TEMPLATE).read_text(encoding="utf-8")
    return page.replace("__COUNT__", str(len(items))).replace("__DATA__", embedded)
