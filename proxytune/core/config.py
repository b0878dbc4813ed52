"""Run parameters: the stages' models (`proxytune.core.params`) under one run, presets, and
overrides.

A run is described by a preset name plus overrides, e.g. `{"supervisor.steps": 100}` or
`{"supervisor": {"steps": 100}}`. Both reach every pipeline step as plain parameters and
are resolved here, so the Kubeflow UI, the CLI and tests share one source of truth, and a
typo or bad value fails in the first (CPU) step with a message naming the field.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import ValidationError

from proxytune.core.params import (
    EvalParams,
    IngestParams,
    Params,
    ProxyParams,
    RegistryParams,
    StudentParams,
    SupervisorParams,
)


class RunParams(Params):
    ingest: IngestParams = IngestParams()
    supervisor: SupervisorParams = SupervisorParams()
    proxy: ProxyParams = ProxyParams()
    student: StudentParams = StudentParams()
    evaluation: EvalParams = EvalParams()
    registry: RegistryParams = RegistryParams()

    @classmethod
    def resolve(cls, preset: str = "tiny", overrides: dict[str, Any] | None = None) -> RunParams:
        """Preset values, then `overrides` on top; raises ValueError naming bad fields."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
        merged = _deep_merge(copy.deepcopy(PRESETS[preset]), _nest(overrides or {}))
        try:
            return cls.model_validate(merged)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors(include_url=False)
            )
            raise ValueError(f"invalid run parameters (preset {preset!r}): {problems}") from None


PRESETS: dict[str, dict[str, Any]] = {
    # CPU, random-weight tiny models: the whole pipeline in minutes; what tests and the demo run.
    "tiny": {},
    # One 24 GB GPU: the paper's SDXL supervisor with a 1B student, fewer proxy images.
    "small": {
        "supervisor": {"backend": "sdxl", "micro_batch_size": 1},
        "proxy": {"num_images": 200, "batch_size": 4},
        "student": {
            "backend": "janus-pro-1b",
            "steps": 500,
            "learning_rate": 1e-4,
            "rank": 64,
            "batch_size": 8,
            "micro_batch_size": 2,
        },
        "evaluation": {
            "clip_encoder": "clip-vit-b32",
            "dino_encoder": "dino-vits16",
            "num_prompts": 10,
            "images_per_prompt": 2,
            "batch_size": 4,
            "variance_samples": 25,
            "methods": ["student", "supervisor", "direct"],
        },
    },
    # GPU settings after the paper and the diffusers DreamBooth-LoRA recipe (Wu et al., arXiv 2503.10125).
    "paper": {
        "supervisor": {"backend": "sdxl"},
        "proxy": {"num_images": 1000, "batch_size": 8},
        "student": {
            "backend": "lumina-mgpt-7b-768",
            "steps": 1000,
            "learning_rate": 1e-4,
            "rank": 128,
            "batch_size": 8,
            "micro_batch_size": 4,
        },
        "evaluation": {
            "clip_encoder": "clip-vit-b32",
            "dino_encoder": "dino-vits16",
            "num_prompts": 25,
            "images_per_prompt": 4,
            "variance_samples": 100,  # as the supplementary's Fig. 1
            "methods": ["student", "supervisor", "direct", "base"],
        },
    },
}


def preset_values() -> dict[str, dict[str, Any]]:
    """Every parameter (`section.field`) of every preset, defaults filled in. Not validated, so
    a preset that needs something from the user (a weights location) still shows."""
    defaults = RunParams().model_dump()
    return {
        name: _flatten(_deep_merge(copy.deepcopy(defaults), copy.deepcopy(preset)))
        for name, preset in PRESETS.items()
    }


def parameter_bounds() -> dict[str, str]:
    """Every parameter (`section.field`) with its allowed range, e.g. `> 0, <= 1,000,000`, for
    `proxytune presets`."""
    import annotated_types

    symbols = {
        annotated_types.Gt: (">", "gt"),
        annotated_types.Ge: (">=", "ge"),
        annotated_types.Lt: ("<", "lt"),
        annotated_types.Le: ("<=", "le"),
        annotated_types.MaxLen: ("items <=", "max_length"),
    }
    bounds = {}
    for section, info in RunParams.model_fields.items():
        for name, field in info.annotation.model_fields.items():
            limits = [
                f"{symbols[type(c)][0]} {_number(getattr(c, symbols[type(c)][1]))}"
                for c in field.metadata
                if type(c) in symbols
            ]
            bounds[f"{section}.{name}"] = ", ".join(limits)
    return bounds


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value and key != "student_sampling":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    """`["supervisor.steps=100", "proxy.prompt_template=a {identifier} {class_noun}"]` -> dict.

    Values are read as JSON when they parse as JSON (numbers, booleans, null), else as text.
    """
    import json

    overrides: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {assignment!r} is not of the form section.field=value")
        try:
            overrides[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key.strip()] = raw
    return overrides


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        node = nested
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r} conflicts with another override")
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            _deep_merge(node[leaf], _nest(value))
        else:
            node[leaf] = _nest(value) if isinstance(value, dict) else value
    return nested


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base
