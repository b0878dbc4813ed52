import pytest

from proxytune.core.config import PRESETS, RunParams, parse_overrides


def test_tiny_preset_uses_tiny_backends():
    params = RunParams.resolve("tiny")
    assert params.supervisor.backend == "tiny-sd"
    assert params.student.backend == "tiny-janus"
    assert (params.evaluation.clip_encoder, params.evaluation.dino_encoder) == ("tiny-clip", "tiny-dino")
    assert (params.evaluation.clip_source, params.evaluation.dino_source) == (None, None)
    assert params.evaluation.variance_samples == 4  # small: the tiny evaluation stays fast


VQGAN = {"student.vq_source": "s3://models/chameleon-vqgan"}


def test_paper_preset_resolves_to_registered_backends():
    params = RunParams.resolve("paper", VQGAN)
    assert params.proxy.num_images == 1000
    assert (params.supervisor.backend, params.supervisor.learning_rate) == ("sdxl", None)  # its recipe's
    assert (params.student.backend, params.student.rank) == ("lumina-mgpt-7b-768", 128)
    assert params.evaluation.variance_samples == 100  # as the supplementary's Fig. 1


def test_the_paper_student_needs_the_chameleon_vqgan_before_anything_runs():
    with pytest.raises(ValueError, match="vq_source: lumina-mgpt-7b-768's release holds no VQ tokenizer"):
        RunParams.resolve("paper")
    assert RunParams.resolve("paper", {"student.model_source": "/models/lumina"}).student.vq_source is None


def test_dotted_and_nested_overrides_merge_over_the_preset():
    params = RunParams.resolve("paper", {**VQGAN, "supervisor.steps": 7, "student": {"rank": 2}})
    assert params.supervisor.steps == 7
    assert params.supervisor.backend == "sdxl"
    assert params.student.rank == 2
    assert params.student.backend == "lumina-mgpt-7b-768"


def test_integral_floats_from_kfp_are_accepted():
    # KFP passes dict parameters through protobuf Struct: every number arrives as a float.
    assert RunParams.resolve("tiny", {"proxy": {"num_images": 4.0}}).proxy.num_images == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"supervisor.stepz": 3}, "supervisor.stepz: Extra inputs are not permitted"),
        ({"supervisor.steps": 0}, "supervisor.steps: Input should be greater than 0"),
        ({"student.backend": "gpt-image"}, "unknown student backend 'gpt-image'; available: janus-pro-1b"),
        ({"evaluation.num_prompts": 26}, "evaluation.num_prompts: Input should be less than or equal to 25"),
        ({"proxy.prompt_template": "a {class_noun}"}, "prompt_template must contain {identifier}"),
        ({"proxy.prompt_template": "a {identifier} {colour}"}, "may use only {identifier} and {class_noun}"),
        (
            {"supervisor.resolution": 500},
            "supervisor.resolution: Value error, resolution 500 must be a multiple of 64",
        ),
        ({"proxy.shards": 20}, "shards: 20 shards for 16 images leave some empty"),
        ({"proxy.prompt_bank": ["a dog"]}, "prompt_bank[0] must contain {identifier}"),
        (
            {"evaluation.variance_samples": 1},
            "evaluation.variance_samples: Value error, one sample has no variance; use 0 (off) or at least 2",
        ),
        ({"evaluation.variance_samples": -1}, "evaluation.variance_samples: Input should be greater than"),
    ],
)
def test_bad_overrides_name_the_field(overrides, message):
    with pytest.raises(ValueError, match="invalid run parameters") as error:
        RunParams.resolve("tiny", overrides)
    assert message in str(error.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match=f"unknown preset 'huge'; available: {', '.join(sorted(PRESETS))}"):
        RunParams.resolve("huge")


def test_parse_overrides_reads_json_values_and_keeps_text():
    assert parse_overrides(
        ["supervisor.steps=12", "proxy.prompt_template=a {identifier} toy", "x.y=null"]
    ) == {
        "supervisor.steps": 12,
        "proxy.prompt_template": "a {identifier} toy",
        "x.y": None,
    }
    with pytest.raises(ValueError, match=r"not of the form section\.field=value"):
        parse_overrides(["steps"])


def test_dotted_and_nested_overrides_of_one_section_combine():
    params = RunParams.resolve("tiny", {"student.rank": 3, "student": {"steps": 5}, "student.seed": 9})
    assert (params.student.rank, params.student.steps, params.student.seed) == (3, 5, 9)
