"""Run config: one YAML file that describes a run for `run --local --config`, `submit` and
`schedule` alike, so a subject's retraining is a reviewed file in git, not a command line.

```yaml
subjects:                      # one or more; relative folders are relative to this file
  - uri: s3://proxytune/subjects/rex
    class_noun: dog
    name: rex                  # optional: default the folder's name
    identifier: sks            # optional: default sks, then ohwx, zwx, ...
    proxy_uri: ""              # optional: import proxy images from here instead of drawing them
preset: small
overrides: {student.steps: 500, proxy.shards: 4}
registered_model_name: proxytune-rex   # optional: default proxytune-<subject names>
experiment: proxytune
```

Everything is validated when the file is loaded (presets and overrides by
`RunParams.resolve`, subjects by `plan_subjects`), and errors name the file and the key,
so a bad file fails before anything is compiled, submitted or run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from proxytune.core.config import PRESETS, RunParams
from proxytune.stages.ingest import plan_subjects


class SubjectConfig(BaseModel):
    """One subject: `plan_subjects`' input, checked on its own so errors name its index."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(min_length=1)
    class_noun: str = Field(min_length=1)
    name: str | None = None
    identifier: str | None = None
    proxy_uri: str | None = None

    @field_validator("uri", "proxy_uri")
    @classmethod
    def _relative_to_the_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        base = (info.context or {}).get("base_dir")
        if not value or base is None or value.startswith("s3://"):
            return value
        return str((Path(base) / Path(value).expanduser()).resolve())

    @model_validator(mode="after")
    def _plannable(self) -> SubjectConfig:
        plan_subjects([self.fields()])
        return self

    def fields(self) -> dict[str, str]:
        return self.model_dump(exclude_none=True)


MLFLOW_NAME_MAX = 256  # the length of the name columns in MLflow's database


def check_mlflow_name(name: str, what: str) -> str:
    """A registered model or experiment name MLflow will accept (its rules: not blank, no `/`
    or `:`, not a path segment like `.` or `..`; at most 256 characters), checked before the
    run starts rather than in its last step."""
    if not name.strip() or name != name.strip():
        raise ValueError(f"{what} {name!r} is blank or has spaces at its ends")
    if "/" in name or ":" in name:
        raise ValueError(f"{what} {name!r}: MLflow names cannot contain '/' or ':'")
    if name in (".", "..") or len(name) > MLFLOW_NAME_MAX or not name.isprintable():
        raise ValueError(f"{what} {name!r} is not a valid MLflow name (printable, at most {MLFLOW_NAME_MAX})")
    return name


class RunConfig(BaseModel):
    """A run: subjects, parameters (preset + overrides) and where MLflow records it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subjects: list[SubjectConfig] = Field(min_length=1)
    preset: str = "tiny"
    overrides: dict[str, Any] = {}
    registered_model_name: str = ""
    experiment: str = Field("proxytune", min_length=1)
    _source: str = PrivateAttr("")  # the file, for error messages; "" when built from flags

    @field_validator("subjects")
    @classmethod
    def _distinct(cls, subjects: list[SubjectConfig]) -> list[SubjectConfig]:
        plan_subjects([s.fields() for s in subjects])  # names and identifiers tell them apart
        return subjects

    @field_validator("registered_model_name")
    @classmethod
    def _registrable(cls, name: str) -> str:
        return check_mlflow_name(name, "registered model name") if name else name

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, name: str) -> str:
        return check_mlflow_name(name, "experiment name")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str) -> str:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
        return preset

    @field_validator("overrides")
    @classmethod
    def _resolvable(cls, overrides: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "preset" in info.data:  # else the preset's own error says what is wrong
            RunParams.resolve(info.data["preset"], overrides)
        return overrides

    @property
    def source(self) -> str:
        return self._source

    def subject_fields(self) -> list[dict[str, str]]:
        return [s.fields() for s in self.subjects]

    def pipeline_subjects(self) -> list[dict[str, str]]:
        """Every subject as planned: `uri`, `class_noun`, `name`, `identifier` (defaults filled
        in) and `proxy_uri` ("" to draw the proxy images)."""
        return [
            {
                "uri": p["source_uri"],
                "class_noun": p["class_noun"],
                "name": p["name"],
                "identifier": p["identifier"],
                "proxy_uri": p.get("proxy_uri", ""),
            }
            for p in plan_subjects(self.subject_fields())
        ]

    def pipeline_arguments(self) -> dict[str, Any]:
        """The pipeline's parameters (`pipelines.proxy_tuning`), what both `run --local` and
        `submit` pass: the first subject in the UI's single-subject fields, the rest as
        `extra_subjects`, each as planned, so what runs is what was validated.
        `mlflow_tracking_uri` is left to the runner's environment."""
        first, *extra = self.pipeline_subjects()
        return {
            "subject_uri": first["uri"],
            "class_noun": first["class_noun"],
            "subject_name": first["name"],
            "identifier": first["identifier"],
            "proxy_uri": first["proxy_uri"],
            "extra_subjects": extra,
            "preset": self.preset,
            "overrides": dict(self.overrides),
            "mlflow_experiment": self.experiment,
            "registered_model_name": self.registered_model_name,
        }

    def with_flags(
        self,
        subjects: list[dict[str, str]] | None = None,
        preset: str | None = None,
        overrides: dict[str, Any] | None = None,
        registered_model_name: str | None = None,
        experiment: str | None = None,
    ) -> RunConfig:
        """This config with command-line flags on top: given subjects replace the file's,
        overrides are merged over the file's (a flag's value wins), other flags replace."""
        values = self.model_dump(exclude_none=True)
        chosen = {
            "subjects": subjects,
            "preset": preset,
            "registered_model_name": registered_model_name,
            "experiment": experiment,
        }
        values.update({k: v for k, v in chosen.items() if v is not None})
        values["overrides"] = {**self.overrides, **(overrides or {})}
        source = f"{self._source} with the command-line flags" if self._source else ""
        return validate_run_config(values, source)

    def require_remote_subjects(self) -> None:
        """A cluster's pods read subjects and proxy imports from the object store, never from
        this machine: refuse local folders before anything is submitted."""
        for i, subject in enumerate(self.subjects):
            for key in ("uri", "proxy_uri"):
                value = getattr(subject, key)
                if value and not value.startswith("s3://"):
                    raise ValueError(
                        f"{self._prefix()}subjects[{i}].{key}: a cluster run reads s3://bucket/prefix, "
                        f"not a local folder ({value}); copy it to MinIO/S3 first (e.g. mc cp --recursive)"
                    )

    def _prefix(self) -> str:
        return f"{self._source}: " if self._source else ""


def validate_run_config(values: Any, source: str = "", base_dir: Path | None = None) -> RunConfig:
    """A RunConfig from plain values; raises ValueError with one `source: key: problem` per
    problem. `base_dir`: where relative subject folders are (the config file's folder)."""
    prefix = f"{source}: " if source else ""
    if not isinstance(values, dict):
        raise ValueError(
            f"{prefix}a run config is a mapping with the keys {', '.join(RunConfig.model_fields)}, "
            f"got {type(values).__name__}"
        )
    try:
        config = RunConfig.model_validate(values, context={"base_dir": base_dir})
    except ValidationError as error:
        raise ValueError("\n".join(prefix + _problem(e) for e in error.errors(include_url=False))) from None
    config._source = source
    return config


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a run-config YAML file (see the module's docstring)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"run config {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read the run config: {error}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    return validate_run_config(values, str(path), path.resolve().parent)


def _problem(error: dict) -> str:
    """`subjects[0].class_noun: Field required`, `unknown key 'presett'`, ..."""
    *parents, last = error["loc"] or ("",)
    where = _location(parents if error["type"] == "extra_forbidden" else [*parents, last])
    if error["type"] == "extra_forbidden":
        known = ", ".join((SubjectConfig if parents else RunConfig).model_fields)
        return f"{where + ': ' if where else ''}unknown key {last!r} (known: {known})"
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    return f"{where}: {message}" if where else message


def _location(loc: list) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
