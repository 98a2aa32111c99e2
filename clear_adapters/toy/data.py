"""Procedural scenes for the toy FLUX: coloured shapes on a plain background, with their captions.

A scene is a list of :class:`Shape` (kind, colour, centre, radius) on a background colour. Scenes are
drawn with torch at 4x supersampling and box-filtered down (anti-aliased edges), so a batch of 64
scenes at 32 px takes a few milliseconds and is identical on every machine. Captions name colour,
size and one of nine positions (a 3 x 3 grid), or a count of objects of one colour, e.g.
``"a big red circle in the top left"``, ``"three blue squares"``,
``"a red circle in the top left and a green square in the bottom right"``.

Everything takes a ``torch.Generator``: the same seed gives the same scenes and captions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

#: Image side in pixels (the toy's native resolution: 16 x 16 latent tokens).
IMAGE_SIZE = 32
#: RGB in [0, 1]. The base model learns these six; plugin words below are learned by the variant/LoRA.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.16), "orange": (0.96, 0.55, 0.10), "yellow": (0.93, 0.88, 0.20),
    "green": (0.16, 0.70, 0.24), "blue": (0.16, 0.32, 0.90), "purple": (0.60, 0.24, 0.80),
}
#: The colour word only the fine-tuned variant knows.
VARIANT_COLOUR = "cyan"
VARIANT_COLOURS = {**COLOURS, VARIANT_COLOUR: (0.12, 0.85, 0.86)}
BACKGROUND = (0.06, 0.06, 0.09)
#: The LoRA's trigger word and what it does: a light ("snowy") background instead of the dark one.
LORA_TRIGGER = "snowy"
LORA_BACKGROUND = (0.88, 0.89, 0.92)
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
SIZES = {"small": 0.09, "medium": 0.14, "big": 0.21}  # radius as a fraction of the image side
#: The 3 x 3 grid of positions, row-major: index = 3 * row + column.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
COUNTS = {2: "two", 3: "three", 4: "four"}
#: Every word a caption (of the base, the variant or the LoRA) can contain: the tokenizers' vocabulary.
VOCABULARY = sorted({"a", "in", "the", "and", "one", *COLOURS, VARIANT_COLOUR, LORA_TRIGGER, *SHAPES,
                     *PLURALS.values(), *SIZES, *(w for p in POSITIONS for w in p.split()), *COUNTS.values()})


@dataclass(frozen=True)
class Shape:
    """One object: ``kind`` in :data:`SHAPES`, ``colour`` a palette name, centre and radius in [0, 1] units."""

    kind: str
    colour: str
    x: float
    y: float
    radius: float
    size: str = "medium"

    @property
    def cell(self) -> int:
        """Index of the 3 x 3 grid cell holding the centre (see :data:`POSITIONS`)."""
        return position_cell(self.x, self.y)


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    caption: str
    background: tuple[float, float, float] = BACKGROUND
    palette: dict = field(default_factory=lambda: VARIANT_COLOURS, compare=False, repr=False)


def position_cell(x: float, y: float) -> int:
    column = min(2, max(0, int(x * 3)))
    row = min(2, max(0, int(y * 3)))
    return 3 * row + column


def cell_centre(cell: int) -> tuple[float, float]:
    return ((cell % 3 + 0.5) / 3, (cell // 3 + 0.5) / 3)


def _choice(options, gen):
    return options[int(torch.randint(len(options), (1,), generator=gen))]


def _uniform(low: float, high: float, gen) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _article(word: str) -> str:
    return "a"


def describe_shape(shape: Shape, with_size: bool, with_position: bool) -> str:
    words = ["a"] + ([shape.size] if with_size else []) + [shape.colour, shape.kind]
    if with_position:
        words += ["in", "the", POSITIONS[shape.cell]]
    return " ".join(words)


def _place(cell: int, size: str, kind: str, colour: str, gen) -> Shape:
    cx, cy = cell_centre(cell)
    jitter = 0.05  # stays well inside the cell: the caption's position is the truth
    radius = SIZES[size] * _uniform(0.9, 1.1, gen)
    return Shape(kind, colour, cx + _uniform(-jitter, jitter, gen), cy + _uniform(-jitter, jitter, gen), radius, size)


def single_scene(colour: str, cell: int, gen, *, kind: str | None = None, size: str | None = None,
                 with_size: bool | None = None) -> Scene:
    """One object of ``colour`` in grid cell ``cell``; kind and size drawn from ``gen`` unless given."""
    kind = kind or _choice(SHAPES, gen)
    named_size = size is not None or (with_size if with_size is not None else bool(torch.rand((), generator=gen) < 0.5))
    size = size or (_choice(("small", "big"), gen) if named_size else "medium")
    shape = _place(cell, size, kind, colour, gen)
    return Scene((shape,), describe_shape(shape, named_size, True))


def count_scene(colour: str, count: int, gen, *, kind: str | None = None) -> Scene:
    """``count`` small objects of one colour and kind in distinct cells; the caption names only the count."""
    kind = kind or _choice(SHAPES, gen)
    cells = torch.randperm(9, generator=gen)[:count].tolist()
    shapes = tuple(_place(c, "small", kind, colour, gen) for c in cells)
    return Scene(shapes, f"{COUNTS[count]} {colour} {PLURALS[kind]}")


def pair_scene(gen, colours=tuple(COLOURS)) -> Scene:
    """Two objects of different colours in different cells, both with positions in the caption."""
    first, second = torch.randperm(len(colours), generator=gen)[:2].tolist()
    cells = torch.randperm(9, generator=gen)[:2].tolist()
    shapes = tuple(_place(cell, "small", _choice(SHAPES, gen), colours[c], gen) for c, cell in zip((first, second), cells))
    caption = " and ".join(describe_shape(s, False, True) for s in shapes)
    return Scene(shapes, caption)


def random_scene(gen, colours=tuple(COLOURS), empty_caption: float = 0.1) -> Scene:
    """A training scene: 50% single object, 25% counts, 15% pairs; ``empty_caption`` of them uncaptioned."""
    kind = float(torch.rand((), generator=gen))
    if kind < 0.5:
        scene = single_scene(_choice(colours, gen), int(torch.randint(9, (1,), generator=gen)), gen)
    elif kind < 0.75:
        scene = count_scene(_choice(colours, gen), _choice((2, 3, 4), gen), gen)
    else:
        scene = pair_scene(gen, colours)
    if float(torch.rand((), generator=gen)) < empty_caption:
        scene = replace(scene, caption="")
    return scene


def with_trigger(scene: Scene) -> Scene:
    """The LoRA's version of a scene: light background, caption prefixed with the trigger word."""
    caption = f"{LORA_TRIGGER} {scene.caption}".strip()
    return replace(scene, caption=caption, background=LORA_BACKGROUND)


# ------------------------------------------------------------------------------------------------ drawing
def _coverage(shapes, size: int, supersample: int) -> torch.Tensor:
    """(len(shapes), size, size) coverage in [0, 1] of each shape, computed for all shapes at once."""
    if not shapes:
        return torch.zeros(0, size, size)
    n = size * supersample
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    params = torch.tensor([[s.x, s.y, s.radius, SHAPES.index(s.kind)] for s in shapes], dtype=torch.float32)
    cx, cy, r, kind = (params[:, i, None, None] for i in range(4))
    dx, dy = coords[None, None, :] - cx, coords[None, :, None] - cy
    circle = dx * dx + dy * dy <= r * r
    half = r * math.sqrt(math.pi) / 2  # a square of the same area as the circle of this radius
    square = (dx.abs() <= half) & (dy.abs() <= half)
    top, bottom = -r, 0.7 * r  # triangle: apex up, base 0.7 r below the centre, half-width 1.1 r there
    triangle = (dy >= top) & (dy <= bottom) & (dx.abs() <= (dy - top) / (bottom - top) * 1.1 * r)
    inside = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
    return torch.nn.functional.avg_pool2d(inside.float()[:, None], supersample)[:, 0]


def shape_masks(scene: Scene, size: int = IMAGE_SIZE, supersample: int = 4) -> torch.Tensor:
    """(objects, size, size) coverage in [0, 1] of each shape (anti-aliased by supersampling)."""
    for s in scene.shapes:
        if s.kind not in SHAPES:
            raise ValueError(f"unknown shape kind {s.kind!r}; expected one of {SHAPES}")
    return _coverage(scene.shapes, size, supersample)


def render_batch(scenes, size: int = IMAGE_SIZE, supersample: int = 4) -> torch.Tensor:
    """(B, 3, size, size) float images in [0, 1]; in each scene later shapes are drawn over earlier ones."""
    scenes = list(scenes)
    shapes = [s for scene in scenes for s in scene.shapes]
    for s in shapes:
        if s.kind not in SHAPES:
            raise ValueError(f"unknown shape kind {s.kind!r}; expected one of {SHAPES}")
    coverage = _coverage(shapes, size, supersample)
    images = torch.tensor([scene.background for scene in scenes], dtype=torch.float32)[:, :, None, None]
    images = images.expand(len(scenes), 3, size, size).clone()
    index = 0
    for b, scene in enumerate(scenes):
        for shape in scene.shapes:
            colour = torch.tensor(scene.palette[shape.colour], dtype=torch.float32)[:, None, None]
            mask = coverage[index]
            images[b] = images[b] * (1 - mask) + colour * mask
            index += 1
    return images


def render(scene: Scene, size: int = IMAGE_SIZE) -> torch.Tensor:
    """The scene as a (3, size, size) float image in [0, 1]."""
    return render_batch([scene], size)[0]


def foreground_mask(scene: Scene, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(size, size) boolean: where the scene has an object (coverage >= 0.5)."""
    masks = shape_masks(scene, size)
    return masks.amax(0) >= 0.5 if len(masks) else torch.zeros(size, size, dtype=torch.bool)


# ------------------------------------------------------------------------------------------------ prompt sets
def single_object_prompts(count: int = 36, seed: int = 0, colours=tuple(COLOURS)) -> list[Scene]:
    """``count`` single-object scenes covering every colour and every position evenly (fixed order)."""
    gen = torch.Generator().manual_seed(seed)
    pairs = [(c, cell) for cell in range(9) for c in colours]
    order = torch.randperm(len(pairs), generator=gen).tolist()
    scenes = []
    for i in range(count):
        colour, cell = pairs[order[i % len(pairs)]]
        scenes.append(single_scene(colour, cell, gen, with_size=False))
    return scenes


def without_positions(scene: Scene) -> Scene:
    """The scene captioned without positions (what a ControlNet prompt says: the control image places it)."""
    shapes = scene.shapes
    if not scene.caption:
        return scene
    if len(shapes) > 1 and len({(s.colour, s.kind) for s in shapes}) == 1:
        caption = f"{COUNTS[len(shapes)]} {shapes[0].colour} {PLURALS[shapes[0].kind]}"
    else:
        named_size = len(shapes) == 1 and shapes[0].size != "medium"
        caption = " and ".join(describe_shape(s, named_size, False) for s in shapes)
    return replace(scene, caption=caption)


def colour_scenes(colour: str, count: int, seed: int = 0) -> list[Scene]:
    """``count`` single-object scenes of ``colour`` over the nine positions (e.g. the variant's ``cyan``)."""
    gen = torch.Generator().manual_seed(seed)
    return [single_scene(colour, i % 9, gen, with_size=False) for i in range(count)]


def distill_prompts(count: int = 512, seed: int = 7) -> list[str]:
    """``count`` distinct captions drawn like the training data (the CLEAR adapters' distillation prompts).

    Empty captions are left out (the distiller's prompt list has no blank lines); repeats are skipped, so
    the list is the same for a given ``(count, seed)``. (Saying every other caption without its positions
    was tried: the ControlNet's effect under CLEAR rose from 0.74 to 0.85 of full attention's, but the
    fine-tuned variant's fell from 28.6/30.6 dB to 21.8/24.9 dB; docs/TOY.md.)"""
    gen = torch.Generator().manual_seed(seed)
    captions: dict[str, None] = {}
    while len(captions) < count:
        caption = random_scene(gen, empty_caption=0.0).caption
        captions.setdefault(caption, None)
    return list(captions)
