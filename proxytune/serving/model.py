"""The registered student as an MLflow pyfunc model (logged "from code": nothing pickled).

    model = mlflow.pyfunc.load_model("models:/proxytune-dog@champion")
    images = model.predict(["a sks dog in the snow"], params={"seed": 3, "num_images": 4})

Input: prompts (a list, or a one-column DataFrame). Params (the model signature declares
them with this student's reference defaults, so MLflow passes them through, also to
`mlflow models serve`): `seed`, `num_images` per prompt, `guidance_scale`, `top_k`,
`temperature`, `top_p`. Output: one row per image with its `prompt`, `seed` and `image`
(PNG bytes; base64 in JSON responses). Image k of the request uses seed `seed + k`, so a
request is reproducible whatever the micro-batching.

The base model comes from the id and revision in the adapter's `proxytune.json`, or from
`PROXYTUNE_BASE_MODEL` (a folder, `s3://` prefix or hub id of the same weights, for
air-gapped serving); `PROXYTUNE_SERVE_BATCH` images go through the model at once (default 8).
The predict method has no type hints on purpose: MLflow would infer a signature from them
and drop the declared params.
"""

from __future__ import annotations

import os

import mlflow
from mlflow.pyfunc import PythonModel

BASE_MODEL_ENV = "PROXYTUNE_BASE_MODEL"
BATCH_ENV = "PROXYTUNE_SERVE_BATCH"
MAX_IMAGES = 256
SAMPLING_PARAMS = ("guidance_scale", "top_k", "temperature", "top_p")


class StudentModel(PythonModel):
    def load_context(self, context) -> None:
        from proxytune.backends._tuned import load_student
        from proxytune.core.contracts import ADAPTER_ARTIFACT

        adapter = context.artifacts[ADAPTER_ARTIFACT]
        self.backend, self.card = load_student(adapter, base=os.environ.get(BASE_MODEL_ENV) or None)
        self.batch_size = int(os.environ.get(BATCH_ENV, "8"))

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from proxytune.core.images import png_bytes

        params = params or {}
        prompts = [str(p) for p in (model_input.iloc[:, 0] if hasattr(model_input, "iloc") else model_input)]
        count, seed = int(params.get("num_images", 1)), int(params.get("seed", 0))
        if not prompts or not 1 <= count * len(prompts) <= MAX_IMAGES:
            raise ValueError(f"a request draws 1 to {MAX_IMAGES} images: {len(prompts)} prompts x {count}")
        sampling = self.backend.sampling.override(**{k: params.get(k) for k in SAMPLING_PARAMS})
        repeated = [p for p in prompts for _ in range(count)]
        seeds = [seed + k for k in range(len(repeated))]
        images = self.backend.generate(repeated, seeds, sampling, self.batch_size)
        return pd.DataFrame({"prompt": repeated, "seed": seeds, "image": [png_bytes(i) for i in images]})


mlflow.models.set_model(StudentModel())
