"""The built-in synthetic set: coloured shapes on a plain background, deterministic by seed.

Three parts, each from its own random stream (so the eval set is held out and sizes don't shift each other):
- align: one caption per image ("a small red circle on the left.") for stage 1;
- instruct: multi-turn chat; every record opens with a multiple-choice question worded exactly like
  lmms-eval's `mmbench_en_dev_static` prompt (answer: the letter) so a tiny model learns the eval format,
  followed by 0-2 open questions (colour, shape, count, position, comparison, detail); ~2 % are text-only;
- eval: held-out multiple-choice items in MMBench's schema, a parquet file lmms-eval reads like MMBench, one
  `category` per question type.

Each question type draws its own kind of scene (align draws the same mix, so stage 1 sees every kind): colour,
shape, count and position 1..max_objects shapes; relative_position and relative_size 2-3 shapes of distinct
colours; count_small 3-6 tiny shapes on a 3x3 grid (colours may repeat).

What a tiny model learns in minutes (docs/miniature.md): colour and count (<= 2 objects) fast, shape slowly,
shuffled option letters not at all. Hence a canonical option order per question type (red is always A) by
default. Every type is on by default, so the eval's per-category scores say something about visual detail.
"""

from __future__ import annotations

import io
import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

from dsvlm.data.common import IMAGE_TOKEN, TOKEN_PATTERN, atomic_output
from dsvlm.data.llava import prepare_into
from dsvlm.errors import DataError

if TYPE_CHECKING:
    from dsvlm.data.latents import LatentRequest

EVAL_FILE = "eval/synthetic.parquet"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "green": (34, 160, 64),
    "blue": (37, 84, 230),
    "yellow": (240, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.13, "large": 0.2}  # radius as a fraction of the image side
TINY = "tiny"  # the size of count_small's shapes, whose centres are only 0.25 apart
RADII = {**SIZES, TINY: 0.08}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}
COUNT_WORDS = ("one", "two", "three", "four", "five", "six")
JITTER = 0.03  # centre offset, fraction of the side: images of one layout are not pixel-identical
TINY_JITTER = 0.015  # keeps tiny neighbours >= 1.9 px apart at 32 px
# Object centres (fractions of the side) and how answers name them. All layouts keep centres >= 0.5 apart,
# so the largest shapes (radius 0.2) never overlap.
CENTRES = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
PLACES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
    "top left": "in the top left corner",
    "top right": "in the top right corner",
    "bottom left": "in the bottom left corner",
    "bottom right": "in the bottom right corner",
}
_CORNERS = ("top left", "top right", "bottom left", "bottom right")
LAYOUTS: dict[int, list[tuple[str, ...]]] = {
    1: [("left",), ("right",), ("top",), ("bottom",), ("center",)],
    2: [("left", "right"), ("top", "bottom")],
    3: list(combinations(_CORNERS, 3)),
    4: [_CORNERS],
}
GRID_OBJECTS = (3, 6)  # count_small: this many tiny shapes, each in its own cell of the 3x3 grid of CENTRES
# Relative position: the relation, and the axis (0: x, 1: y) and direction in which the other shape lies.
RELATIONS: dict[str, tuple[int, int]] = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}

# Multiple-choice question types with their canonical options (the option order used unless shuffled).
MC_OPTIONS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": COUNT_WORDS[:4],
    "position": ("left", "right", "top", "bottom"),
    "relative_position": tuple(COLOURS),
    "relative_size": ("larger", "smaller"),
    "count_small": COUNT_WORDS[2:6],
}
QUESTION_TYPES = tuple(MC_OPTIONS)
OPTION_ORDERS = ("canonical", "shuffled")
LETTERS = ("A", "B", "C", "D")

# lmms-eval 0.7.3 mmbench_en_dev_static: mmbench.yaml metadata.sys_prompt, and the task's post_prompt.
MMBENCH_OPTIONS_HEADER = "There are several options:"
MMBENCH_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."

MC_QUESTIONS = {
    "colour": "What colour is {target}?",
    "shape": "What shape is the {colour} object?",
    "count": "How many shapes are in the image?",
    "position": "Where is the {colour} shape?",
    "relative_position": "What colour is the shape {relation} the {colour} shape?",
    "relative_size": "Is the {colour1} shape larger or smaller than the {colour2} shape?",
    "count_small": "How many tiny shapes are in the image?",
}
CAPTION_PROMPTS = ("Describe the image briefly.", "Give a short caption of the picture.", "What is in the image?")
CAPTION_OBJECT = "a {size} {colour} {shape} {place}"
TARGET_ONE, TARGET_PLACED = "the shape", "the shape {place}"
OPEN = {
    "colour": ("What colour is {target}?", "It is {colour}."),
    "shape": ("What shape is the {colour} object?", "It is a {shape}."),
    "count": ("How many shapes are there?", "There is one shape.", "There are {count} shapes."),
    "position": ("Where is the {colour} {shape}?", "It is {place}."),
    "size": ("Is the {colour} shape small or large?", "It is {size}."),
    "larger": (
        "Which is larger, the {colour1} {shape1} or the {colour2} {shape2}?",
        "The {colour} {shape} is larger.",
        "They are the same size.",
    ),
    "same_shape": (
        "Do the {colour1} and {colour2} objects have the same shape?",
        "Yes, they have the same shape.",
        "No, they have different shapes.",
    ),
    "exists": ("Is there a {colour} {shape} in the image?", "Yes.", "No."),
    "background": ("What colour is the background?", "The background is {background}."),
}
OPEN_TYPES = ("colour", "shape", "count", "position", "comparison", "detail")
TEXT_ONLY = (
    ("Which colours can the shapes have?", "They can be red, green, blue or yellow."),
    ("Which shapes can appear in the pictures?", "A circle, a square or a triangle."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("How many sides does a square have?", "A square has four sides."),
)
TEXT_ONLY_FRACTION = 0.02  # like LLaVA-665K's text-only share: keeps the text-only code path exercised


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str
    position: str
    dx: float
    dy: float


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Shape, ...]

    def target(self, obj: Shape) -> str:
        """How a question names one object: by its place, unless it is alone."""
        return TARGET_ONE if len(self.objects) == 1 else TARGET_PLACED.format(place=PLACES[obj.position])


@dataclass(frozen=True)
class Choice:
    """A multiple-choice item: question, option texts by letter, answer letter, question type."""

    question: str
    options: dict[str, str]
    answer: str
    category: str


def mmbench_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """The text lmms-eval's `mmbench_doc_to_text` builds for `mmbench_en_dev_static` (with its post_prompt)."""
    lines = [MMBENCH_OPTIONS_HEADER] + [f"{key}. {value}" for key, value in sorted(options.items()) if value]
    body = "\n".join(lines)
    query = f"{hint} {question} {body}" if hint else f"{question} {body}"
    return f"{query}\n{MMBENCH_POST_PROMPT}"


def sample_scene(rng: random.Random, max_objects: int, min_objects: int = 1) -> Scene:
    layout = rng.choice(LAYOUTS[rng.randint(min_objects, max_objects)])
    colours = rng.sample(list(COLOURS), len(layout))  # distinct colours: "the red object" is unambiguous
    objects = tuple(
        Shape(
            colour=colour,
            shape=rng.choice(SHAPES),
            size=rng.choice(list(SIZES)),
            position=position,
            dx=rng.uniform(-JITTER, JITTER),
            dy=rng.uniform(-JITTER, JITTER),
        )
        for colour, position in zip(colours, layout, strict=True)
    )
    return Scene(background=rng.choice(list(BACKGROUNDS)), objects=objects)


def _sample_grid_scene(rng: random.Random) -> Scene:
    """3-6 tiny shapes in distinct cells of the 3x3 grid; colours may repeat (there are only four)."""
    positions = rng.sample(list(CENTRES), rng.randint(*GRID_OBJECTS))
    objects = tuple(
        Shape(
            colour=rng.choice(list(COLOURS)),
            shape=rng.choice(SHAPES),
            size=TINY,
            position=position,
            dx=rng.uniform(-TINY_JITTER, TINY_JITTER),
            dy=rng.uniform(-TINY_JITTER, TINY_JITTER),
        )
        for position in positions
    )
    return Scene(background=rng.choice(list(BACKGROUNDS)), objects=objects)


def _scene_for(rng: random.Random, kind: str, max_objects: int) -> Scene:
    """A scene with the object count question type `kind` needs (`max_objects` bounds the original four)."""
    if kind == "count_small":
        return _sample_grid_scene(rng)
    if kind in ("relative_position", "relative_size"):
        return sample_scene(rng, 3, min_objects=2)  # 3 corners at most: some relation is always unambiguous
    return sample_scene(rng, max_objects)


def render(scene: Scene, size: int) -> Image.Image:
    """Draw a scene (no anti-aliasing: the pixels depend only on the scene)."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fx, fy = CENTRES[obj.position]
        cx, cy, r = (fx + obj.dx) * size, (fy + obj.dy) * size, RADII[obj.size] * size
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([round(cx - r), round(cy - r), round(cx + r), round(cy + r)], fill=fill)
        elif obj.shape == "square":
            s = 0.85 * r  # a square of the same "radius" looks bigger than the circle
            draw.rectangle([round(cx - s), round(cy - s), round(cx + s), round(cy + s)], fill=fill)
        else:
            top, base = (round(cx), round(cy - r)), round(cy + 0.8 * r)
            draw.polygon([top, (round(cx - r), base), (round(cx + r), base)], fill=fill)
    return image


def only_neighbour(scene: Scene, reference: Shape, relation: str) -> Shape | None:
    """The one shape lying `relation` the reference (e.g. further left, in any row), None unless exactly one."""
    axis, sign = RELATIONS[relation]
    ref = CENTRES[reference.position][axis]
    found = [o for o in scene.objects if (CENTRES[o.position][axis] - ref) * sign > 0]
    return found[0] if len(found) == 1 else None


def _choice(rng: random.Random, scene: Scene, kind: str, order: str) -> Choice | None:
    """A multiple-choice item of type `kind` about the scene; None when the scene doesn't allow it."""
    if kind == "relative_position":
        triples = [
            (ref, relation, other)
            for ref in scene.objects
            for relation in RELATIONS
            if (other := only_neighbour(scene, ref, relation)) is not None
        ]
        if not triples:
            return None
        ref, relation, other = rng.choice(triples)
        return _options(rng, MC_QUESTIONS[kind].format(relation=relation, colour=ref.colour), other.colour, kind, order)
    if kind == "relative_size":
        pairs = [(a, b) for a in scene.objects for b in scene.objects if a.size != b.size]
        if not pairs:
            return None
        first, second = rng.choice(pairs)
        answer = "larger" if RADII[first.size] > RADII[second.size] else "smaller"
        return _options(
            rng, MC_QUESTIONS[kind].format(colour1=first.colour, colour2=second.colour), answer, kind, order
        )
    if kind == "count_small":
        return _options(rng, MC_QUESTIONS[kind], COUNT_WORDS[len(scene.objects) - 1], kind, order)
    obj = rng.choice(scene.objects)
    if kind == "colour":
        question, answer = MC_QUESTIONS[kind].format(target=scene.target(obj)), obj.colour
    elif kind == "shape":
        question, answer = MC_QUESTIONS[kind].format(colour=obj.colour), obj.shape
    elif kind == "count":
        question, answer = MC_QUESTIONS[kind], COUNT_WORDS[len(scene.objects) - 1]
    else:
        if obj.position not in MC_OPTIONS["position"]:
            return None
        question, answer = MC_QUESTIONS[kind].format(colour=obj.colour), obj.position
    return _options(rng, question, answer, kind, order)


def _options(rng: random.Random, question: str, answer: str, kind: str, order: str) -> Choice:
    values = list(MC_OPTIONS[kind])
    if order == "shuffled":
        rng.shuffle(values)
    options = dict(zip(LETTERS, values, strict=False))  # shape has 3 options, relative_size 2, the rest 4
    letter = next(key for key, value in options.items() if value == answer)
    return Choice(question, options, letter, kind)


def _unique(scene: Scene, *fields: str) -> set[Shape]:
    """The shapes that `fields` (e.g. colour) name unambiguously: no other shape shares those values."""
    keys = Counter(tuple(getattr(o, f) for f in fields) for o in scene.objects)
    return {o for o in scene.objects if keys[tuple(getattr(o, f) for f in fields)] == 1}


def _open_question(rng: random.Random, scene: Scene, kind: str) -> tuple[str, str] | None:
    """An open question and its short answer; None when the scene doesn't allow it: a comparison of one
    shape, or a question naming a shape by colour (and shape) that another shape shares (count_small scenes)."""
    by_colour, by_name = _unique(scene, "colour"), _unique(scene, "colour", "shape")
    obj = rng.choice(scene.objects)
    if kind == "colour":
        q, a = OPEN["colour"]
        return q.format(target=scene.target(obj)), a.format(colour=obj.colour)
    if kind in ("shape", "position") and obj not in (by_colour if kind == "shape" else by_name):
        return None
    if kind == "shape":
        q, a = OPEN["shape"]
        return q.format(colour=obj.colour), a.format(shape=obj.shape)
    if kind == "count":
        q, one, many = OPEN["count"]
        n = len(scene.objects)
        return q, one if n == 1 else many.format(count=COUNT_WORDS[n - 1])
    if kind == "position":
        q, a = OPEN["position"]
        return q.format(colour=obj.colour, shape=obj.shape), a.format(place=PLACES[obj.position])
    if kind == "comparison":
        if len(scene.objects) < 2:
            return None
        first, second = rng.sample(scene.objects, 2)
        if rng.random() < 0.5:
            if not {first, second} <= by_name:
                return None
            q, larger, same = OPEN["larger"]
            question = q.format(colour1=first.colour, shape1=first.shape, colour2=second.colour, shape2=second.shape)
            if first.size == second.size:
                return question, same
            big = first if RADII[first.size] > RADII[second.size] else second
            return question, larger.format(colour=big.colour, shape=big.shape)
        if not {first, second} <= by_colour:
            return None
        q, yes, no = OPEN["same_shape"]
        question = q.format(colour1=first.colour, colour2=second.colour)
        return question, yes if first.shape == second.shape else no
    # detail: things only the pixels tell
    pick = rng.randrange(3)
    if pick == 0:
        if obj not in by_colour or obj.size not in SIZES:  # tiny is neither small nor large
            return None
        q, a = OPEN["size"]
        return q.format(colour=obj.colour), a.format(size=obj.size)
    if pick == 1:
        q, a = OPEN["background"]
        return q, a.format(background=scene.background)
    q, yes, no = OPEN["exists"]
    if rng.random() < 0.5:
        return q.format(colour=obj.colour, shape=obj.shape), yes
    present = {(o.colour, o.shape) for o in scene.objects}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    colour, shape = rng.choice(absent)
    return q.format(colour=colour, shape=shape), no


def scene_caption(scene: Scene) -> str:
    parts = [
        CAPTION_OBJECT.format(size=o.size, colour=o.colour, shape=o.shape, place=PLACES[o.position])
        for o in scene.objects
    ]
    return " and ".join(parts) + "."


@dataclass(frozen=True)
class SyntheticConfig:
    """What the synthetic set holds (the options of `dsvlm prepare synthetic`), checked on creation."""

    n_align: int = 2000
    n_instruct: int = 3000
    n_eval: int = 500
    seed: int = 0
    image_size: int = 32
    # The multiple-choice types of the instruct and of the eval set (a list is accepted and kept as a tuple).
    question_types: tuple[str, ...] = QUESTION_TYPES
    option_order: str = "canonical"
    max_objects: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "question_types", tuple(self.question_types))
        for flag, value in (("--n-align", self.n_align), ("--n-instruct", self.n_instruct), ("--n-eval", self.n_eval)):
            if value < 1:
                raise DataError(f"{flag} must be at least 1, got {value}")
        if self.image_size < 16:
            raise DataError(f"--image-size must be at least 16 pixels, got {self.image_size}")
        if not self.question_types:
            raise DataError(f"--question-types needs at least one of {', '.join(QUESTION_TYPES)}")
        unknown = [t for t in self.question_types if t not in QUESTION_TYPES]
        if unknown:
            raise DataError(f"unknown question type(s) {', '.join(unknown)}; choose from {', '.join(QUESTION_TYPES)}")
        if self.option_order not in OPTION_ORDERS:
            raise DataError(f"--option-order must be one of {', '.join(OPTION_ORDERS)}, got {self.option_order!r}")
        if not 1 <= self.max_objects <= len(LAYOUTS):
            raise DataError(f"--max-objects must be between 1 and {len(LAYOUTS)}, got {self.max_objects}")

    def stream(self, part: str) -> random.Random:
        """The random stream of one part (align, instruct, eval): the sizes of the others don't shift it."""
        # String seeds are hashed with SHA-512 by `random`: stable across runs and Python versions.
        return random.Random(f"dsvlm-synthetic/{self.seed}/{part}")


def _sample_choice(rng: random.Random, config: SyntheticConfig) -> tuple[Scene, Choice]:
    kind = rng.choice(config.question_types)
    while True:  # terminates: every type has scenes that allow it (position: any 1-object side layout)
        scene = _scene_for(rng, kind, config.max_objects)
        choice = _choice(rng, scene, kind, config.option_order)
        if choice is not None:
            return scene, choice


def _write_image(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    # One record per line inside the list: line numbers in reports point at records.
    path.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n")


def _turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    """LLaVA turns from (question, answer) pairs."""
    return [turn for q, a in pairs for turn in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


def generate_synthetic(out_raw_dir: Path, config: SyntheticConfig = SyntheticConfig()) -> dict[str, Path]:
    """Write LLaVA-format `align.json`, `instruct.json`, their PNGs under `images/`, and the MMBench-format
    eval set `eval/synthetic.parquet` into `out_raw_dir`. Deterministic by `config`. Returns those paths."""
    out = Path(out_raw_dir)
    images = out / "images"
    _write_records(out / "align.json", _align_records(config, images))
    _write_records(out / "instruct.json", _instruct_records(config, images))
    eval_path = out / EVAL_FILE
    _write_eval(eval_path, config)
    return {"align": out / "align.json", "instruct": out / "instruct.json", "images": images, "eval": eval_path}


def _align_records(config: SyntheticConfig, images: Path) -> list[dict[str, Any]]:
    """Stage-1 captions, one per image, of the scenes the question types draw; the PNGs are written under
    `images`."""
    rng = config.stream("align")
    records = []
    for i in range(config.n_align):
        scene = _scene_for(rng, rng.choice(config.question_types), config.max_objects)
        rel = f"align/{i:06d}.png"
        _write_image(render(scene, config.image_size), images / rel)
        prompt = rng.choice(CAPTION_PROMPTS)
        turns = _turns((f"{IMAGE_TOKEN}\n{prompt}", scene_caption(scene)))
        records.append({"id": f"align-{i:06d}", "image": rel, "conversations": turns})
    return records


def _instruct_records(config: SyntheticConfig, images: Path) -> list[dict[str, Any]]:
    """Stage-2 chats: a multiple-choice question in lmms-eval's wording, then 0-2 open follow-ups; a few
    text-only chats. The PNGs are written under `images`."""
    rng = config.stream("instruct")
    records = []
    for i in range(config.n_instruct):
        rid = f"instruct-{i:06d}"
        if rng.random() < TEXT_ONLY_FRACTION:
            records.append({"id": rid, "conversations": _turns(*rng.sample(TEXT_ONLY, rng.randint(1, 2)))})
            continue
        scene, choice = _sample_choice(rng, config)
        pairs = [(f"{IMAGE_TOKEN}\n{mmbench_prompt(choice.question, choice.options)}", choice.answer)]
        # Follow-ups never repeat the multiple-choice question's type in open form.
        follow_types = [t for t in OPEN_TYPES if t != choice.category]
        for _ in range(rng.randint(0, 2)):
            qa = None
            while qa is None:  # terminates: colour, count and background suit every scene
                qa = _open_question(rng, scene, rng.choice(follow_types))
            pairs.append(qa)
        rel = f"instruct/{i:06d}.png"
        _write_image(render(scene, config.image_size), images / rel)
        records.append({"id": rid, "image": rel, "conversations": _turns(*pairs)})
    return records


# Columns of a local MMBench file (lmms-eval's mmbench_en_dev_static reads these), with their types.
MMBENCH_FEATURES = {
    "index": "int64",
    "question": "string",
    "hint": "string",
    "A": "string",
    "B": "string",
    "C": "string",
    "D": "string",
    "answer": "string",
    "category": "string",
    "L2-category": "string",
    "source": "string",
    "split": "string",
    "image": "image",
}


def _write_eval(path: Path, config: SyntheticConfig) -> None:
    """The held-out multiple-choice items as a parquet file in MMBench's schema."""
    import datasets

    rng = config.stream("eval")
    rows: dict[str, list[Any]] = {key: [] for key in MMBENCH_FEATURES}
    for index in range(config.n_eval):
        scene, choice = _sample_choice(rng, config)
        buffer = io.BytesIO()
        render(scene, config.image_size).save(buffer, format="PNG")
        row = {
            "index": index,
            "question": choice.question,
            "hint": None,
            **{letter: choice.options.get(letter) for letter in LETTERS},
            "answer": choice.answer,
            "category": choice.category,
            "L2-category": "synthetic perception",
            "source": "dsvlm-synthetic",
            "split": "dev",
            "image": {"bytes": buffer.getvalue(), "path": None},
        }
        for key, value in row.items():
            rows[key].append(value)
    features = datasets.Features(
        {key: datasets.Image() if key == "image" else datasets.Value(dtype) for key, dtype in MMBENCH_FEATURES.items()}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # its tqdm bar would break the rich display on stderr
    try:
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    finally:
        if enabled:
            datasets.enable_progress_bars()


def synthetic_vocabulary() -> list[str]:
    """Every word piece (TOKEN_PATTERN) any synthetic caption, question, answer or eval prompt can contain,
    the MMBench prompt text and option letters included; sorted. The tiny model's tokenizer is built on it."""
    texts = [
        IMAGE_TOKEN,
        MMBENCH_OPTIONS_HEADER,
        MMBENCH_POST_PROMPT,
        *LETTERS,
        *CAPTION_PROMPTS,
        CAPTION_OBJECT,
        " and ",
        TARGET_ONE,
        TARGET_PLACED,
        *MC_QUESTIONS.values(),
        *(text for texts in OPEN.values() for text in texts),
        *(text for pair in TEXT_ONLY for text in pair),
        *COLOURS,
        *SHAPES,
        *RADII,
        *BACKGROUNDS,
        *COUNT_WORDS,
        *CENTRES,
        *RELATIONS,
        *PLACES.values(),
        *(option for options in MC_OPTIONS.values() for option in options),
    ]
    placeholder = re.compile(r"\{\w+\}")
    return sorted({token for text in texts for token in TOKEN_PATTERN.findall(placeholder.sub(" ", text))})


def prepare_synthetic(
    out: Path,
    config: SyntheticConfig = SyntheticConfig(),
    *,
    workers: int = 1,
    overwrite: bool = False,
    latents: LatentRequest | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate the synthetic set into a new dataset `out` and prepare it like any LLaVA data. Returns the
    manifest. The raw files stay in the dataset: `align.json`, `instruct.json`, `images/`, `eval/`."""
    options = {**asdict(config), "question_types": list(config.question_types), "workers": workers}
    with atomic_output(Path(out), overwrite) as tmp:
        files = generate_synthetic(tmp, config)
        return prepare_into(
            tmp,
            {"align": files["align"], "instruct": files["instruct"]},
            files["images"],
            manifest_image_root="images",
            kind="synthetic",
            options=options,
            strict=True,  # generated data must be valid: a generator bug should fail loudly, not be skipped
            workers=workers,
            progress=progress,
            extra={"eval": {"synthetic": EVAL_FILE}},
            latents=latents,
        )
