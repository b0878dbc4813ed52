"""The parameters of each stage, one validated model per section of a run (`ingest`,
`supervisor`, `proxy`, `student`, `evaluation`, `registry`), with the bounds every field
allows. `proxytune.core.config` assembles them into a run's parameters from a preset and
overrides. It imports no torch itself (validating a backend name still loads the backends)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxytune.core.prompts import INSTANCE_TEMPLATE, fill
from proxytune.core.registry import ENCODERS, STUDENTS, SUPERVISORS

# Upper bounds of counts and sizes: far above any real run (the paper draws 1000 proxy images,
# trains 1000 steps at rank 128), low enough that a typo (`1e9`) fails at once instead of hours
# in. `proxytune presets` prints every field's bounds.
MAX_STEPS = 1_000_000
MAX_IMAGES = 1_000_000
MAX_RANK = 1024
MAX_BATCH = 4096
MAX_RESOLUTION = 4096
MAX_INFERENCE_STEPS = 1000
MAX_GUIDANCE = 100.0
MAX_SEED = 2**32 - 1


class Sampling(BaseModel):
    """Sampling parameters for image codes; `top_k=0` keeps every code, `top_p=1` is off."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    guidance_scale: float = Field(ge=1.0, description="classifier-free guidance; 1 = conditional only")
    temperature: float = Field(gt=0.0)
    top_k: int = Field(ge=0, description="keep the k most likely codes; 0 = all")
    top_p: float = Field(gt=0.0, le=1.0, description="nucleus; 1 = off")

    def override(self, **values: float | int | None) -> Sampling:
        """These parameters with every non-None value in `values` replacing the default."""
        return Sampling.model_validate({**self.model_dump(), **set_values(values)})

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0


def set_values(values: dict[str, float | int | None]) -> dict[str, float | int]:
    return {k: v for k, v in values.items() if v is not None}


def check_overrides(values: dict[str, float | int | None]) -> dict[str, float | int]:
    """The set values of `values`, after checking they are sampling parameters in range, so a
    bad override fails before any model is loaded (every backend's defaults are in range)."""
    Sampling(guidance_scale=1.0, temperature=1.0, top_k=0, top_p=1.0).override(**values)
    return set_values(values)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_template(value: str, field: str) -> str:
    """A prompt template that names the subject: {identifier}, optionally {class_noun}."""
    try:
        value.format(identifier="sks", class_noun="dog")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"{field} may use only {{identifier}} and {{class_noun}}: {error}") from None
    if "{identifier}" not in value:
        raise ValueError(f"{field} must contain {{identifier}}")
    return value


class IngestParams(Params):
    """Limits on every image a run reads (subject photos and imported proxy images), checked
    before any model loads: sizes from the folder or the S3 listing before a byte is read,
    dimensions from the image header before any pixel is decoded."""

    max_pixels: int = Field(
        40_000_000,
        gt=0,
        le=150_000_000,
        description="most pixels (width x height) of an image; at most 150 M, under the 179 M "
        "Pillow refuses to open",
    )
    max_file_bytes: int = Field(
        50_000_000, gt=0, le=2_000_000_000, description="largest file, in bytes (50 MB by default)"
    )
    min_side: int = Field(64, gt=0, le=4096, description="shortest width or height in pixels")
    min_photos: int = Field(
        2, gt=0, le=1000, description="fewest distinct subject photos, once exact duplicates are dropped"
    )

    @model_validator(mode="after")
    def _fits_the_smallest(self) -> IngestParams:
        if self.min_side**2 > self.max_pixels:
            raise ValueError(f"max_pixels {self.max_pixels} is below min_side squared ({self.min_side**2})")
        return self


class TrainingParams(Params):
    """What every LoRA training run takes (supervisor and student share the loop)."""

    steps: int = Field(40, gt=0, le=MAX_STEPS)
    learning_rate: float = Field(1e-3, gt=0, le=10.0)
    warmup_steps: int = Field(
        0, ge=0, le=MAX_STEPS, description="linear warm-up, then a constant learning rate"
    )
    rank: int = Field(4, gt=0, le=MAX_RANK)
    alpha: float | None = Field(
        None, gt=0, le=100 * MAX_RANK, description="LoRA alpha; default: equal to rank"
    )
    batch_size: int = Field(1, gt=0, le=MAX_BATCH)
    micro_batch_size: int | None = Field(
        None,
        gt=0,
        le=MAX_BATCH,
        description="images per forward pass (gradients accumulate over the batch); default: the batch",
    )
    max_grad_norm: float = Field(1.0, gt=0, le=1e6)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    checkpoint_every: int = Field(
        100,
        ge=0,
        le=MAX_STEPS,
        description="steps between checkpoints in the object store (0: none); a re-run resumes",
    )
    checkpoints_kept: int = Field(2, gt=0, le=100, description="the newest checkpoints kept")


class SupervisorParams(TrainingParams):
    """DreamBooth-LoRA on the diffusion supervisor; unset values follow the backend's recipe
    (diffusers' DreamBooth-LoRA example for that model)."""

    backend: str = "tiny-sd"
    model_source: str | None = Field(
        None, description="hub id, folder or s3:// prefix; default: the backend's"
    )
    steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="default: the backend's recipe")
    learning_rate: float | None = Field(None, gt=0, le=10.0, description="default: the backend's recipe")
    rank: int | None = Field(None, gt=0, le=MAX_RANK, description="default: the backend's recipe")
    batch_size: int | None = Field(None, gt=0, le=MAX_BATCH, description="default: the backend's recipe")
    resolution: int | None = Field(
        None, gt=0, le=MAX_RESOLUTION, description="training size; default: the backend's"
    )

    @field_validator("resolution")
    @classmethod
    def _latent_friendly(cls, value: int | None) -> int | None:
        if value is not None and value % 64:
            raise ValueError(f"resolution {value} must be a multiple of 64 (VAE and patch sizes)")
        return value

    def with_recipe(self, recipe) -> SupervisorParams:
        """These parameters with the backend's recipe where none is set."""
        defaults = {k: getattr(recipe, k) for k in ("steps", "learning_rate", "rank", "batch_size")}
        return self.model_copy(update={k: v for k, v in defaults.items() if getattr(self, k) is None})

    _check_backend = field_validator("backend")(lambda v: SUPERVISORS.check(v))


class ProxyParams(Params):
    """Proxy dataset generation by the tuned supervisor."""

    num_images: int = Field(16, gt=0, le=MAX_IMAGES)
    batch_size: int = Field(8, gt=0, le=MAX_BATCH)
    inference_steps: int | None = Field(
        None, gt=0, le=MAX_INFERENCE_STEPS, description="default: the supervisor's reference value"
    )
    guidance_scale: float | None = Field(
        None, ge=1.0, le=MAX_GUIDANCE, description="default: the supervisor's reference value"
    )
    prompt_template: str = INSTANCE_TEMPLATE
    prompt_bank: list[str] = Field(
        [],
        max_length=10_000,
        description="more prompt templates; image i uses ([prompt_template] + bank)[i mod its length]",
    )
    shards: int = Field(1, gt=0, le=256, description="generation tasks, each on its own GPU pod")
    keep_fraction: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="keep this share of the proxy images most like the subject photos "
        "(DINO, evaluation.dino_encoder); default: keep all, as the paper does",
    )
    shard_size: int = Field(
        1000, gt=0, le=MAX_IMAGES, description="images per folder of the dataset (shard-NNNNN/)"
    )
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @field_validator("prompt_template")
    @classmethod
    def _template_names_subject(cls, value: str) -> str:
        return check_template(value, "prompt_template")

    @field_validator("prompt_bank")
    @classmethod
    def _bank_names_subject(cls, values: list[str]) -> list[str]:
        return [check_template(v, f"prompt_bank[{i}]") for i, v in enumerate(values)]

    def prompts(self, identifier: str, class_noun: str) -> list[str]:
        """The prompts image i cycles through: the template, then the bank."""
        return [fill(t, identifier, class_noun) for t in [self.prompt_template, *self.prompt_bank]]

    @model_validator(mode="after")
    def _every_shard_draws(self) -> ProxyParams:
        if self.shards > self.num_images:
            raise ValueError(f"shards: {self.shards} shards for {self.num_images} images leave some empty")
        return self


class StudentParams(TrainingParams):
    """LoRA on the AR student, trained on the proxy dataset only."""

    backend: str = "tiny-janus"
    model_source: str | None = Field(
        None, description="hub id, folder or s3:// prefix; default: the backend's"
    )
    vq_source: str | None = Field(
        None,
        description="Lumina-mGPT: the Chameleon VQGAN converted by `proxytune convert-vqgan` "
        "(folder, hub id or s3:// prefix); default: the vqgan/ folder beside the model",
    )
    rank: int = Field(8, gt=0, le=MAX_RANK)
    batch_size: int = Field(4, gt=0, le=MAX_BATCH)
    micro_batch_size: int | None = Field(
        4, gt=0, le=MAX_BATCH, description="images per forward pass; gradients accumulate over the batch"
    )
    null_prompt_prob: float = Field(0.05, ge=0.0, lt=1.0, description="prompt dropout, for CFG")
    holdout_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="share of each proxy dataset never trained on (held-out loss)"
    )
    gradient_checkpointing: bool | None = Field(None, description="activation checkpointing; default: on GPU")

    _check_backend = field_validator("backend")(lambda v: STUDENTS.check(v))

    @model_validator(mode="after")
    def _vq_is_findable(self) -> StudentParams:
        backend = STUDENTS.create(self.backend)
        released = not backend.source.id.startswith("random:")
        if backend.separate_vq and released and not (self.vq_source or self.model_source):
            raise ValueError(
                f"vq_source: {self.backend}'s release holds no VQ tokenizer; convert Meta's Chameleon "
                "tokenizer with `proxytune convert-vqgan` and set student.vq_source to the folder "
                "(or student.model_source to a folder with it in vqgan/)"
            )
        return self


EVAL_METHODS = ("student", "supervisor", "direct", "base")


class EvalParams(Params):
    """DreamBench-style evaluation of the student beside the other methods."""

    methods: list[str] = Field(
        ["student", "supervisor"],
        description="what is sampled and scored: student (proxy-tuned), supervisor (its diffusion "
        "teacher), direct (the student's base LoRA-tuned on the real photos, same steps and settings), "
        "base (the untuned AR model)",
    )

    clip_encoder: str = "tiny-clip"
    dino_encoder: str = "tiny-dino"
    clip_source: str | None = Field(
        None, description="hub id, folder or s3:// prefix of clip_encoder's weights; default: the encoder's"
    )
    dino_source: str | None = Field(
        None, description="hub id, folder or s3:// prefix of dino_encoder's weights; default: the encoder's"
    )
    num_prompts: int = Field(2, gt=0, le=25)
    images_per_prompt: int = Field(2, gt=0, le=100)
    student_sampling: dict[str, int | float] = Field(
        {},
        description="guidance_scale, temperature, top_k (0 = all codes), top_p for the student; "
        "each one not set keeps the backend's reference value",
    )
    supervisor_guidance_scale: float | None = Field(
        None, ge=1.0, le=MAX_GUIDANCE, description="default: the backend's"
    )
    supervisor_inference_steps: int | None = Field(
        None, gt=0, le=MAX_INFERENCE_STEPS, description="default: the backend's"
    )
    batch_size: int = Field(8, gt=0, le=MAX_BATCH)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    variance_samples: int = Field(
        4,
        ge=0,
        le=10_000,
        description="extra samples per model and subject for the feature-variance analysis "
        "(DINO features; prompts cycle through the DreamBench list); 0: none",
    )

    _check_encoders = field_validator("clip_encoder", "dino_encoder")(lambda v: ENCODERS.check(v))

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in EVAL_METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(EVAL_METHODS)}")
        if "student" not in value:
            raise ValueError("methods must include student: the others are compared with it")
        if len(set(value)) != len(value):
            raise ValueError(f"methods {value} lists one twice")
        return [m for m in EVAL_METHODS if m in value]

    _check_sampling = field_validator("student_sampling")(lambda v: check_overrides(v))

    @field_validator("variance_samples")
    @classmethod
    def _variance_needs_two(cls, value: int) -> int:
        if value == 1:
            raise ValueError("one sample has no variance; use 0 (off) or at least 2")
        return value


GATED_METRICS = ("clip_i", "clip_t", "dino")


class RegistryParams(Params):
    """Promotion of a new student version to `champion` in the MLflow registry."""

    gate: dict[str, float] = Field(
        {"dino": 0.0, "clip_i": 0.0, "clip_t": 0.01},
        description="how far below the champion's each metric may be (0: not below); "
        "metrics not listed are not gated",
    )
    settle_seconds: float = Field(
        2.0, ge=0.0, le=60.0, description="wait before re-reading the champion after taking it (races)"
    )

    @field_validator("gate")
    @classmethod
    def _known_metrics(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = set(value) - set(GATED_METRICS)
        if unknown:
            raise ValueError(f"unknown gate metric(s) {sorted(unknown)}; use {', '.join(GATED_METRICS)}")
        if any(v < 0 for v in value.values()):
            raise ValueError("gate tolerances are allowed drops, so they cannot be negative")
        return value
