"""The shipped toy FLUX: offline loading, what it learned, and CLEAR's fidelity on it (no retraining).

Images are generated once per module (fixtures) at the toy's native settings (32 px, 8 steps) and
shared by the tests; every number asserted here is an acceptance line of the toy (docs/TOY.md).
"""

from __future__ import annotations

import json

import pytest
import torch

import clear_adapters
from clear_adapters import api
from clear_adapters.imaging import psnr
from clear_adapters.toy import data, detector
from clear_adapters.toy import pipeline as toy

#: Single-object prompts for prompt following and the distilled-vs-zero-shot comparison (>= 32).
PROMPTS = 32


@pytest.fixture(scope="module")
def toy_pipe():
    return toy.toy_pipeline()


def _generate(pipe, scenes, seed=0, **overrides):
    return pipe([s.caption for s in scenes], generator=torch.Generator().manual_seed(seed), output_type="pt",
                **toy.toy_call_kwargs(**overrides)).images.float()


@pytest.fixture(scope="module")
def single_object_runs(toy_pipe):
    """The same 32 prompts and noise: full attention, distilled r=4 (toy/r4), zero-shot r=4 (pattern only)."""
    scenes = data.single_object_prompts(PROMPTS, seed=0)
    runs = {"full": _generate(toy_pipe, scenes)}
    clear_adapters.load("toy/r4", toy_pipe)
    runs["distilled"] = _generate(toy_pipe, scenes)
    clear_adapters.unload(toy_pipe)
    clear_adapters.attach(4, toy_pipe)
    runs["zero_shot"] = _generate(toy_pipe, scenes)
    clear_adapters.unload(toy_pipe)
    return scenes, runs


def _mean_psnr(a, b):
    return sum(psnr(x, y) for x, y in zip(a, b)) / len(a)


def _placement(images, scenes):
    return sum(detector.placed_right(im, s) for im, s in zip(images, scenes)) / len(scenes)


def test_toy_is_a_flux_pipeline_loaded_offline_from_fp16_safetensors(toy_pipe):
    from diffusers import FluxPipeline
    from safetensors import safe_open

    assert type(toy_pipe) is FluxPipeline
    root = toy.WEIGHTS_DIR
    files = [p for p in root.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) >= 10
    for path in weights:
        with safe_open(str(path), framework="pt") as fh:
            assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F16"}, path
    index = json.loads((root / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and {"tokenizer", "tokenizer_2"} <= set(index)
    params = sum(p.numel() for p in toy_pipe.transformer.parameters())
    assert 2.0e6 < params < 2.6e6, params
    assert toy_pipe.transformer.dtype == torch.float32  # loaded for the CPU; stored in fp16


def test_tokenizers_keep_words_and_encoders_separate_captions(toy_pipe):
    for tokenizer in (toy_pipe.tokenizer, toy_pipe.tokenizer_2):
        assert all(len(tokenizer.tokenize(word)) == 1 for word in data.VOCABULARY)
    captions = ["a red circle in the top left", "a blue circle in the top left", "a red circle in the top right",
                "a red square in the top left", "two red circles", "three red circles", ""]
    embeds, pooled, _ = toy_pipe.encode_prompt(captions, prompt_2=None, max_sequence_length=toy.MAX_SEQUENCE_LENGTH)
    for i in range(len(captions)):
        for j in range(i):
            assert (embeds[i] - embeds[j]).norm() > 0.05 * embeds[i].norm(), (captions[i], captions[j])
            assert (pooled[i] - pooled[j]).norm() > 0.05 * pooled[i].norm(), (captions[i], captions[j])


def test_full_attention_follows_prompts(single_object_runs):
    scenes, runs = single_object_runs
    assert len(scenes) >= 32
    assert _placement(runs["full"], scenes) >= 0.75


def test_distilled_r4_is_close_to_the_teacher_and_far_above_zero_shot(single_object_runs):
    scenes, runs = single_object_runs
    distilled = _mean_psnr(runs["distilled"], runs["full"])
    zero_shot = _mean_psnr(runs["zero_shot"], runs["full"])
    assert distilled >= 17.0, distilled
    assert distilled - zero_shot >= 5.0, (distilled, zero_shot)
    full_score, clear_score = _placement(runs["full"], scenes), _placement(runs["distilled"], scenes)
    assert full_score - clear_score <= 0.10, (full_score, clear_score)


def test_registry_names_resolve_to_the_packaged_adapters(toy_pipe):
    for name, window in (("toy", 4), ("toy/r4", 4), ("toy/r2", 2)):
        spec = api.resolve(name)
        assert spec.config.window_size == window and spec.weights_path.is_file()
        assert toy.WEIGHTS_DIR in spec.weights_path.parents and spec.repo_id is None
    handle = clear_adapters.load("toy/r2", toy_pipe)
    try:
        assert handle.config.window_size == 2 and handle.spec.registry_entry.name == "toy/r2"
    finally:
        clear_adapters.unload(toy_pipe)
