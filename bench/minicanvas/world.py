"""The MiniCanvas world: its objects, styles, words for them, and captions.

Everything here is data plus deterministic sampling from a seed; `render.py` draws the
images. Two extra classes make erasure measurable: the object `none` (an object-free
"{style} pattern") and the style `plain` (a flat black object on white), so an erased model
has somewhere neutral to go.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OBJECTS = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "heart")
STYLES = ("stripes", "dots", "checker", "gradient", "sketch", "mosaic", "neon", "watercolor")
NONE_OBJECT = "none"
PLAIN_STYLE = "plain"
OBJECT_CLASSES = (*OBJECTS, NONE_OBJECT)
STYLE_CLASSES = (*STYLES, PLAIN_STYLE)

# Used in training captions for part of the data and measured separately (generality).
OBJECT_SYNONYMS = {
    "circle": ("disc",),
    "square": ("box",),
    "triangle": ("wedge",),
    "star": ("pentagram",),
    "cross": ("plus sign",),
    "ring": ("donut",),
    "crescent": ("moon",),
    "heart": ("love symbol",),
}
STYLE_SYNONYMS = {
    "stripes": ("striped",),
    "dots": ("polka dot",),
    "checker": ("checkerboard",),
    "gradient": ("ombre",),
    "sketch": ("pencil",),
    "mosaic": ("tiled",),
    "neon": ("glowing",),
    "watercolor": ("aquarelle",),
}
# A style described without its name (or a synonym), for "implicit" prompts.
STYLE_DESCRIPTIONS = {
    "stripes": "with red and orange horizontal bands",
    "dots": "covered in small blue spots",
    "checker": "on a green and white grid of squares",
    "gradient": "on a smooth pink to purple fade",
    "sketch": "drawn as a dark outline on cream paper",
    "mosaic": "made of many small colorful tiles",
    "neon": "as a bright light on a black night",
    "watercolor": "painted with soft blurry pastel washes",
}

TRAIN_TEMPLATES = (
    "a {object} in {style} style",
    "{style} {object}",
    "a {style} drawing of a {object}",
    "a {object}, {style}",
    "an image of a {object} in {style} style",
)
# Never used in training: the evaluation template recombines known words in a new order.
HELD_OUT_TEMPLATE = "a drawing of a {object} in {style} style"
IMPLICIT_TEMPLATES = ("a {object} {description}", "an image of a {object} {description}")
IMPLICIT_EVAL_TEMPLATE = "a drawing of a {object} {description}"
PATTERN_TEMPLATES = ("a {style} pattern", "{style} pattern", "an image of a {style} pattern")
PLAIN_TEMPLATES = ("a {object}", "a plain {object}", "a {object} in plain style")

EMPTY_CAPTION_RATE = 0.1
SYNONYM_RATE = 0.2
IMPLICIT_RATE = 0.15
PATTERN_RATE = 0.08
PLAIN_RATE = 0.08


@dataclass(frozen=True)
class Sample:
    """What to draw and what to call it."""

    object: str  # one of OBJECT_CLASSES
    style: str  # one of STYLE_CLASSES
    caption: str


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def training_caption(obj: str, style: str, rng: np.random.Generator) -> str:
    """A caption for an (object, style) image, as seen in training (never the held-out one)."""
    if obj == NONE_OBJECT:
        return _pick(rng, PATTERN_TEMPLATES).format(style=style) if style != PLAIN_STYLE else ""
    if style == PLAIN_STYLE:
        return _pick(rng, PLAIN_TEMPLATES).format(object=obj)
    obj_word = _pick(rng, OBJECT_SYNONYMS[obj]) if rng.random() < SYNONYM_RATE else obj
    if rng.random() < IMPLICIT_RATE:
        template = _pick(rng, IMPLICIT_TEMPLATES)
        return template.format(object=obj_word, description=STYLE_DESCRIPTIONS[style])
    style_word = _pick(rng, STYLE_SYNONYMS[style]) if rng.random() < SYNONYM_RATE else style
    return _pick(rng, TRAIN_TEMPLATES).format(object=obj_word, style=style_word)


def sample(rng: np.random.Generator) -> Sample:
    """One training example: mostly object x style, some patterns, some plain objects."""
    roll = rng.random()
    if roll < PATTERN_RATE:
        obj, style = NONE_OBJECT, _pick(rng, STYLES)
    elif roll < PATTERN_RATE + PLAIN_RATE:
        obj, style = _pick(rng, OBJECTS), PLAIN_STYLE
    else:
        obj, style = _pick(rng, OBJECTS), _pick(rng, STYLES)
    caption = "" if rng.random() < EMPTY_CAPTION_RATE else training_caption(obj, style, rng)
    return Sample(obj, style, caption)


def held_out_prompt(obj: str, style: str) -> str:
    return HELD_OUT_TEMPLATE.format(object=obj, style=style)


def synonym_prompts(obj: str, style: str) -> list[tuple[str, str]]:
    """(prompt, which word was swapped) with synonyms, in the held-out template."""
    prompts = [
        (HELD_OUT_TEMPLATE.format(object=s, style=style), "object") for s in OBJECT_SYNONYMS[obj]
    ]
    prompts += [
        (HELD_OUT_TEMPLATE.format(object=obj, style=s), "style") for s in STYLE_SYNONYMS[style]
    ]
    return prompts


def implicit_prompt(obj: str, style: str) -> str:
    return IMPLICIT_EVAL_TEMPLATE.format(object=obj, description=STYLE_DESCRIPTIONS[style])


def anchor_prompt(obj: str, style: str, erased_kind: str) -> str:
    """What the (obj, style) cell should look like once its `erased_kind` is erased, in the
    world's own neutral captions: the style on an empty canvas for an erased object, a
    plain object for an erased style."""
    if erased_kind == "object":
        return PATTERN_TEMPLATES[0].format(style=style)
    return PLAIN_TEMPLATES[2].format(object=obj)


def training_captions() -> list[str]:
    """Every caption shape the model was trained on, for every pair and word (no empty
    caption, never the held-out evaluation templates): what a MiniCanvas model ships as its
    own prompt sample."""
    texts = []
    for obj in OBJECTS:
        for style in STYLES:
            for template in TRAIN_TEMPLATES:
                for o in (obj, *OBJECT_SYNONYMS[obj]):
                    for s in (style, *STYLE_SYNONYMS[style]):
                        texts.append(template.format(object=o, style=s))
            for template in IMPLICIT_TEMPLATES:
                for o in (obj, *OBJECT_SYNONYMS[obj]):
                    texts.append(template.format(object=o, description=STYLE_DESCRIPTIONS[style]))
        texts += [t.format(object=obj) for t in PLAIN_TEMPLATES]
    texts += [t.format(style=s) for t in PATTERN_TEMPLATES for s in STYLES]
    return texts


def all_caption_words() -> list[str]:
    """Every caption a tokenizer should know well (for training it): a complete sweep."""
    texts = [held_out_prompt(o, s) for o in OBJECTS for s in STYLES]
    for obj in OBJECTS:
        for style in STYLES:
            for template in TRAIN_TEMPLATES:
                for o in (obj, *OBJECT_SYNONYMS[obj]):
                    for s in (style, *STYLE_SYNONYMS[style]):
                        texts.append(template.format(object=o, style=s))
            for template in (*IMPLICIT_TEMPLATES, IMPLICIT_EVAL_TEMPLATE):
                texts.append(template.format(object=obj, description=STYLE_DESCRIPTIONS[style]))
        texts += [t.format(object=obj) for t in PLAIN_TEMPLATES]
    texts += [t.format(style=s) for t in PATTERN_TEMPLATES for s in STYLES]
    return texts
