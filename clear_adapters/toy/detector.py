"""Reads a toy image back: which colours are where, how many objects, how big, what background.

The detector knows the toy's palette and nothing else (no learning): a pixel is foreground when it is
far from the image's background colour, it takes the nearest palette colour, and same-coloured
4-connected pixels form an object. Objects smaller than ``min_area`` pixels are noise. Scores compare
detections with the scene a prompt describes (:mod:`clear_adapters.toy.data`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import BACKGROUND, LORA_BACKGROUND, VARIANT_COLOURS, Scene, foreground_mask, position_cell

#: A pixel farther than this (RGB distance, [0, 1] units) from the background is foreground.
FOREGROUND_DISTANCE = 0.30
#: A foreground pixel farther than this from every palette colour is "other" (blurred edges, artefacts).
PALETTE_DISTANCE = 0.30
MIN_AREA = 4


@dataclass(frozen=True)
class Detection:
    colour: str
    area: int
    x: float  # centroid, in [0, 1] image units
    y: float
    bbox: tuple[int, int, int, int]  # top, left, bottom, right (inclusive), pixels

    @property
    def cell(self) -> int:
        return position_cell(self.x, self.y)


def _as_image(image) -> torch.Tensor:
    from ..imaging import as_tensor

    return as_tensor(image).clamp(0, 1)


def background_colour(image) -> torch.Tensor:
    """The background: per-channel median of the border pixels (objects rarely fill the border)."""
    image = _as_image(image)
    border = torch.cat([image[:, 0], image[:, -1], image[:, 1:-1, 0], image[:, 1:-1, -1]], dim=1)
    return border.median(dim=1).values


def _components(classes: list[list[int]]) -> list[tuple[int, list[tuple[int, int]]]]:
    """4-connected regions of equal class (class < 0: not an object) as (class, [(y, x), ...])."""
    h, w = len(classes), len(classes[0])
    seen = [[False] * w for _ in range(h)]
    regions = []
    for y0 in range(h):
        for x0 in range(w):
            cls = classes[y0][x0]
            if cls < 0 or seen[y0][x0]:
                continue
            seen[y0][x0] = True
            stack, pixels = [(y0, x0)], []
            while stack:  # flood fill; 32 x 32 images: a plain Python loop is ~1 ms
                y, x = stack.pop()
                pixels.append((y, x))
                for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= ny < h and 0 <= nx < w and not seen[ny][nx] and classes[ny][nx] == cls:
                        seen[ny][nx] = True
                        stack.append((ny, nx))
            regions.append((cls, pixels))
    return regions


def detect(image, palette: dict | None = None, min_area: int = MIN_AREA) -> list[Detection]:
    """Objects in ``image`` ((3, H, W) tensor in [0, 1] or PIL), largest first."""
    image = _as_image(image)
    palette = palette or VARIANT_COLOURS
    names = list(palette)
    colours = torch.tensor([palette[n] for n in names], dtype=torch.float32)
    pixels = image.permute(1, 2, 0)  # (H, W, 3)
    foreground = (pixels - background_colour(image)).norm(dim=-1) > FOREGROUND_DISTANCE
    distances = (pixels[:, :, None, :] - colours).norm(dim=-1)  # (H, W, colours)
    nearest = distances.argmin(-1)
    known = distances.min(-1).values <= PALETTE_DISTANCE
    classes = torch.where(foreground & known, nearest, torch.full_like(nearest, -1)).tolist()
    h, w = foreground.shape
    found = []
    for cls, region in _components(classes):
        if len(region) < min_area:
            continue
        ys = [p[0] for p in region]
        xs = [p[1] for p in region]
        found.append(Detection(names[cls], len(region), (sum(xs) / len(xs) + 0.5) / w, (sum(ys) / len(ys) + 0.5) / h,
                               (min(ys), min(xs), max(ys), max(xs))))
    return sorted(found, key=lambda d: -d.area)


# ------------------------------------------------------------------------------------------------ scores
def placed_right(image, scene: Scene) -> bool:
    """Single-object scene: the largest detection has the scene's colour and lies in its 3 x 3 cell."""
    shape = scene.shapes[0]
    found = detect(image)
    return bool(found) and found[0].colour == shape.colour and found[0].cell == shape.cell


def count_right(image, scene: Scene) -> bool:
    """Count scene: as many objects of the scene's colour as the scene has."""
    colour = scene.shapes[0].colour
    return sum(1 for d in detect(image) if d.colour == colour) == len(scene.shapes)


def colour_present(image, colour: str) -> bool:
    """The largest detection has ``colour``."""
    found = detect(image)
    return bool(found) and found[0].colour == colour


def light_background(image) -> bool:
    """The LoRA's attribute: the background is nearer the snowy colour than the plain dark one."""
    bg = background_colour(image)
    return bool((bg - torch.tensor(LORA_BACKGROUND)).norm() < (bg - torch.tensor(BACKGROUND)).norm())


def mask_iou(image, scene: Scene) -> float:
    """ControlNet adherence: IoU of the detected foreground with the scene's object mask."""
    image = _as_image(image)
    found = (image.permute(1, 2, 0) - background_colour(image)).norm(dim=-1) > FOREGROUND_DISTANCE
    truth = foreground_mask(scene, image.shape[-1])
    union = int((found | truth).sum())
    return 1.0 if union == 0 else int((found & truth).sum()) / union
