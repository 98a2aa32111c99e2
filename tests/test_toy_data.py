"""The toy's data generator and detector (no model): captions, determinism, and the detector on ground truth."""

from __future__ import annotations

import torch

from clear_adapters.toy import data, detector


def test_scenes_and_captions_are_deterministic_and_say_what_is_drawn():
    first = [data.random_scene(torch.Generator().manual_seed(7)) for _ in range(1)]
    again = [data.random_scene(torch.Generator().manual_seed(7)) for _ in range(1)]
    assert first == again
    gen = torch.Generator().manual_seed(1)
    scenes = [data.random_scene(gen, empty_caption=0.0) for _ in range(200)]
    for scene in scenes:
        words = scene.caption.split()
        assert set(words) <= set(data.VOCABULARY), scene.caption
        for shape in scene.shapes:
            assert shape.colour in words
        if len(scene.shapes) == 1:  # single objects name their cell
            assert scene.caption.endswith(data.POSITIONS[scene.shapes[0].cell])
    assert torch.equal(data.render_batch(scenes[:5]), data.render_batch(scenes[:5]))


def test_prompt_sets_cover_colours_and_positions():
    scenes = data.single_object_prompts(36)
    assert len({s.shapes[0].colour for s in scenes}) == len(data.COLOURS)
    assert len({s.shapes[0].cell for s in scenes}) == 9
    assert data.without_positions(scenes[0]).caption.split()[-1] in data.SHAPES
    assert all(s.shapes[0].colour == data.VARIANT_COLOUR for s in data.colour_scenes(data.VARIANT_COLOUR, 9))


def test_detector_reads_ground_truth():
    scenes = data.single_object_prompts(36)
    images = data.render_batch(scenes)
    assert all(detector.placed_right(im, s) for im, s in zip(images, scenes))
    gen = torch.Generator().manual_seed(3)
    counts = [data.count_scene(c, n, gen) for c, n in zip(data.COLOURS, (2, 3, 4, 2, 3, 4))]
    assert all(detector.count_right(data.render(s), s) for s in counts)
    assert all(detector.mask_iou(data.render(s), s) > 0.8 for s in counts)
    snowy = data.with_trigger(scenes[0])
    assert snowy.caption.startswith(data.LORA_TRIGGER)
    assert detector.light_background(data.render(snowy)) and not detector.light_background(images[0])
    cyan = data.colour_scenes(data.VARIANT_COLOUR, 1)[0]
    assert detector.colour_present(data.render(cyan), data.VARIANT_COLOUR)
    # A wrong colour or cell is not counted as right.
    moved = data.single_scene("red", (scenes[0].shapes[0].cell + 4) % 9, gen)
    assert not detector.placed_right(data.render(moved), data.single_scene("red", scenes[0].shapes[0].cell, gen))
