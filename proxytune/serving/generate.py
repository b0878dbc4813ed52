"""`proxytune generate`: images from a tuned student, outside the pipeline.

The student is an adapter folder (a `tune_student` output) or a registered model,
`models:/NAME@ALIAS` or `models:/NAME/VERSION`, resolved through `MLFLOW_TRACKING_URI`.
Image i uses seed `seed + i`, so `-n 8 --seed 0` and `-n 4 --seed 4` together give the same
eight images. The output folder appears whole (`N.png`, `grid.png`, `generation.json`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from proxytune.core.contracts import ADAPTER_ARTIFACT, CARD_FILE
from proxytune.core.fsutil import atomic_directory, atomic_write_json
from proxytune.core.images import image_grid
from proxytune.core.params import check_overrides

log = logging.getLogger(__name__)


def resolve_student(student: str, cache_dir: str | Path) -> Path:
    """A local adapter folder for a folder path or a `models:/` URI (downloaded once)."""
    if not student.startswith("models:/"):
        folder = Path(student).expanduser()
        if not folder.is_dir():
            raise ValueError(f"--student {student}: no such folder (or give models:/NAME@ALIAS)")
        return folder
    import os

    import mlflow
    from mlflow.exceptions import MlflowException

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ValueError(f"--student {student}: set MLFLOW_TRACKING_URI to the registry's tracking server")
    try:
        model_dir = mlflow.artifacts.download_artifacts(artifact_uri=student, dst_path=str(cache_dir))
    except MlflowException as error:
        raise ValueError(f"--student {student}: {error.message}") from None
    artifacts = mlflow.models.Model.load(model_dir).flavors.get("python_function", {}).get("artifacts", {})
    adapter = Path(model_dir) / artifacts.get(ADAPTER_ARTIFACT, {}).get("path", ADAPTER_ARTIFACT)
    if not (adapter / CARD_FILE).is_file():
        raise ValueError(f"--student {student}: the registered model holds no proxytune student adapter")
    return adapter


def check_request(prompt: str, count: int, out_dir: str | Path, **sampling: float | int | None) -> None:
    """Refuse a bad request before any model is downloaded or loaded."""
    check_overrides(sampling)
    if count < 1:
        raise ValueError(f"-n must be at least 1, got {count}")
    if not prompt.strip():
        raise ValueError("--prompt must not be empty")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"--out {out_dir} already exists and is not empty; refusing to overwrite it")


def generate_images(
    adapter_dir: str | Path,
    prompt: str,
    out_dir: str | Path,
    count: int = 4,
    seed: int = 0,
    batch_size: int = 8,
    **sampling: float | int | None,
) -> dict[str, Any]:
    """Sample `count` images of `prompt`; write them, a grid and `generation.json` to `out_dir`.

    `sampling` overrides the backend's reference values (guidance_scale, temperature, top_k,
    top_p). Returns what `generation.json` records."""
    from proxytune.backends._tuned import load_student

    check_request(prompt, count, out_dir, **sampling)
    backend, card = load_student(adapter_dir)
    settings = backend.sampling.override(**sampling)
    seeds = [seed + i for i in range(count)]
    log.info("%s: %d image(s) of %r, %s", card.backend, count, prompt, settings)
    images = []
    with tqdm(total=count, desc="images", unit="img") as progress:
        for start in range(0, count, batch_size):
            batch = seeds[start : start + batch_size]
            images += backend.generate([prompt] * len(batch), batch, settings, batch_size)
            progress.update(len(batch))
    record = {
        "prompt": prompt,
        "seeds": seeds,
        "files": [f"{i:03d}.png" for i in range(count)],
        "backend": card.backend,
        "base_model": card.base_model.model_dump(),
        "adapter_sha256": card.adapter_sha256,
        "subjects": [s.model_dump() for s in card.subjects],
        "sampling": settings.model_dump(),
    }
    with atomic_directory(out_dir) as tmp:
        for file, image in zip(record["files"], images, strict=True):
            image.save(tmp / file)
        image_grid(images, columns=math.ceil(math.sqrt(count))).save(tmp / "grid.png")
        atomic_write_json(tmp / "generation.json", record)
    return record
