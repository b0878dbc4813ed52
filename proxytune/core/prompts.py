"""DreamBench evaluation prompts (google/dreambooth, CC BY 4.0; see examples/subjects).

Live subjects (DreamBench: its cats and dogs) use the live list, all others the object list.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)
LIVE_CLASSES = frozenset({"cat", "dog"})
INSTANCE_TEMPLATE = "a {identifier} {class_noun}"  # DreamBooth's instance prompt

OBJECT_PROMPTS = (
    "a {identifier} {class_noun} in the jungle",
    "a {identifier} {class_noun} in the snow",
    "a {identifier} {class_noun} on the beach",
    "a {identifier} {class_noun} on a cobblestone street",
    "a {identifier} {class_noun} on top of pink fabric",
    "a {identifier} {class_noun} on top of a wooden floor",
    "a {identifier} {class_noun} with a city in the background",
    "a {identifier} {class_noun} with a mountain in the background",
    "a {identifier} {class_noun} with a blue house in the background",
    "a {identifier} {class_noun} on top of a purple rug in a forest",
    "a {identifier} {class_noun} with a wheat field in the background",
    "a {identifier} {class_noun} with a tree and autumn leaves in the background",
    "a {identifier} {class_noun} with the Eiffel Tower in the background",
    "a {identifier} {class_noun} floating on top of water",
    "a {identifier} {class_noun} floating in an ocean of milk",
    "a {identifier} {class_noun} on top of green grass with sunflowers around it",
    "a {identifier} {class_noun} on top of a mirror",
    "a {identifier} {class_noun} on top of the sidewalk in a crowded street",
    "a {identifier} {class_noun} on top of a dirt road",
    "a {identifier} {class_noun} on top of a white rug",
    "a red {identifier} {class_noun}",
    "a purple {identifier} {class_noun}",
    "a shiny {identifier} {class_noun}",
    "a wet {identifier} {class_noun}",
    "a cube shaped {identifier} {class_noun}",
)

LIVE_PROMPTS = (
    "a {identifier} {class_noun} in the jungle",
    "a {identifier} {class_noun} in the snow",
    "a {identifier} {class_noun} on the beach",
    "a {identifier} {class_noun} on a cobblestone street",
    "a {identifier} {class_noun} on top of pink fabric",
    "a {identifier} {class_noun} on top of a wooden floor",
    "a {identifier} {class_noun} with a city in the background",
    "a {identifier} {class_noun} with a mountain in the background",
    "a {identifier} {class_noun} with a blue house in the background",
    "a {identifier} {class_noun} on top of a purple rug in a forest",
    "a {identifier} {class_noun} wearing a red hat",
    "a {identifier} {class_noun} wearing a santa hat",
    "a {identifier} {class_noun} wearing a rainbow scarf",
    "a {identifier} {class_noun} wearing a black top hat and a monocle",
    "a {identifier} {class_noun} in a chef outfit",
    "a {identifier} {class_noun} in a firefighter outfit",
    "a {identifier} {class_noun} in a police outfit",
    "a {identifier} {class_noun} wearing pink glasses",
    "a {identifier} {class_noun} wearing a yellow shirt",
    "a {identifier} {class_noun} in a purple wizard outfit",
    "a red {identifier} {class_noun}",
    "a purple {identifier} {class_noun}",
    "a shiny {identifier} {class_noun}",
    "a wet {identifier} {class_noun}",
    "a cube shaped {identifier} {class_noun}",
)


def dreambench_prompts(class_noun: str, count: int = 25) -> list[str]:
    """The first `count` prompt templates of the list for this class."""
    prompts = LIVE_PROMPTS if class_noun.strip().lower() in LIVE_CLASSES else OBJECT_PROMPTS
    if not 1 <= count <= len(prompts):
        raise ValueError(f"count must be between 1 and {len(prompts)}, got {count}")
    return list(prompts[:count])


def fill(template: str, identifier: str | None, class_noun: str) -> str:
    """A prompt with the identifier, or without it (for CLIP-T: "a dog in the jungle")."""
    return " ".join(template.format(identifier=identifier or "", class_noun=class_noun).split())


def evaluation_overlap(prompts: Iterable[str], identifier: str, class_noun: str) -> set[str]:
    """Those of `prompts` that are DreamBench evaluation prompts (training on those would
    flatter the student's evaluation): warned about, and marked in the manifest."""
    evaluation = {_normal(fill(t, identifier, class_noun)) for t in dreambench_prompts(class_noun)}
    overlapping = {p for p in prompts if _normal(p) in evaluation}
    for prompt in sorted(overlapping):
        log.warning("proxy prompt %r is a DreamBench evaluation prompt; marked in the manifest", prompt)
    return overlapping


def _normal(prompt: str) -> str:
    return " ".join(prompt.lower().split())
