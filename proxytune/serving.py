"""The registered student as an MLflow pyfunc model (logged "from code": nothing pickled).

    model = mlflow.pyfunc.load_model("models:/proxytune-dog@champion")
    pngs = model.predict(["a sks dog in the snow"], params={"guidance_scale": 5.0, "seed": 0})

`predict` returns one base64-encoded PNG per prompt; prompt i uses seed `seed + i` and the
backend's reference sampling, with the guidance scale given.
"""

from __future__ import annotations

import base64

import mlflow
from mlflow.pyfunc import PythonModel


class StudentModel(PythonModel):
    def load_context(self, context) -> None:
        from proxytune.registration import ADAPTER_ARTIFACT
        from proxytune.student import load_student

        self.backend, self.card = load_student(context.artifacts[ADAPTER_ARTIFACT])

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        from proxytune.images import png_bytes

        params = params or {}
        prompts, seed = list(model_input), int(params.get("seed", 0))
        sampling = self.backend.sampling.override(guidance_scale=params.get("guidance_scale"))
        images = self.backend.generate(prompts, [seed + i for i in range(len(prompts))], sampling)
        return [base64.b64encode(png_bytes(image)).decode("ascii") for image in images]


mlflow.models.set_model(StudentModel())
