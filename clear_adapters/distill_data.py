"""Distillation data: prompt lists, teacher-generated or image-folder latents, the safetensors cache, batches.

A data set is a table of prompt embeddings (one row per distinct prompt) and, per resolution, packed
clean latents with the index of their prompt. It comes from

* :func:`self_generate`: the teacher pipeline generates latents for prompts (CLEAR's recipe: the
  authors found self-generated data better than real images), or
* :func:`encode_images`: a folder of images (``name.png`` + optional ``name.txt`` caption), each resized
  to the closest training aspect ratio and encoded with the pipeline's VAE;

and is cached as one safetensors file whose name is a hash of everything it depends on (the base
model's fingerprint, prompts or files, resolutions, seeds, sampler settings), so a second run with the
same inputs reads it instead of generating again.

Batches are a pure function of ``(seed, batch index)`` (:func:`batch_for`): each epoch visits every
sample once in an order drawn from the seed, so a resumed run continues with exactly the batches (noise
and timesteps included) that an uninterrupted one would have drawn.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import DistillationError

logger = logging.getLogger("clear_adapters")

#: Training prompts when none are given: varied subjects, styles and layouts (local and global structure).
BUILTIN_PROMPTS = (
    "a red fox standing in fresh snow, morning light",
    "a lighthouse on a rocky coast at sunset, dramatic clouds",
    "a bowl of ramen with egg and spring onions, top view",
    "portrait of an old fisherman with a grey beard, film photo",
    "a futuristic city skyline at night with neon signs",
    "a watercolor painting of a quiet village by a river",
    "a cat sleeping on a stack of books next to a window",
    "an astronaut riding a horse on the moon, digital art",
    "a close-up of a dew-covered spider web at dawn",
    "a vintage red car parked in front of a diner",
    "a dense tropical rainforest with a waterfall",
    "a minimalist living room with a large plant and white walls",
    "a bustling street market in Marrakech, vivid colors",
    "an oil painting of sunflowers in a blue vase",
    "a snowy mountain range reflected in a calm lake",
    "a golden retriever puppy playing with a ball on grass",
    "a medieval castle on a hill under a starry sky",
    "a steaming cup of coffee on a wooden table, shallow depth of field",
    "a herd of elephants crossing a dusty savanna",
    "a pixel art scene of a knight facing a dragon",
    "a bicycle leaning against a brick wall with ivy",
    "an underwater coral reef with colorful fish",
    "a pencil sketch of a woman reading in a cafe",
    "a field of lavender rows stretching to the horizon",
    "a robot chef cooking pancakes in a small kitchen",
    "a foggy forest path with tall pine trees",
    "a plate of sushi arranged on a black slate",
    "a hot air balloon festival over green hills",
    "an ornate library with spiral staircases and warm light",
    "a macro photo of a honeybee on a purple flower",
    "a desert highway with a single truck under a clear sky",
    "a poster with the words OPEN LATE in bold letters",
    "a child flying a kite on a windy beach",
    "a japanese garden with a red bridge and koi pond",
    "a thunderstorm over wheat fields, lightning strike",
    "a still life of lemons, grapes and a silver jug",
    "a train crossing a stone viaduct in the mountains",
    "a cozy cabin interior with a fireplace and a sleeping dog",
    "an isometric illustration of a tiny island with a house",
    "a crowd of people with umbrellas on a rainy street",
    "a glass of orange juice with ice cubes, studio lighting",
    "a panda eating bamboo in a misty forest",
    "a sailboat on a turquoise sea near white cliffs",
    "a neon-lit arcade with rows of game machines",
    "a chessboard mid-game with dramatic side lighting",
    "a basket of freshly baked bread at a bakery counter",
    "a mountain goat on a cliff edge above the clouds",
    "an abstract composition of circles and triangles in primary colors",
)
#: Held-out prompts for ``error_before``/``error_after`` (never trained on when the built-in list is used).
BUILTIN_EVAL_PROMPTS = (
    "a blue heron standing in shallow water at dusk",
    "a busy train station hall with a large clock",
    "a bouquet of tulips on a kitchen table",
    "a snowy village street with warm windows at night",
    "a portrait of a young woman with freckles, soft light",
    "a canyon with layered red rock and a small river",
    "a toy robot on a desk next to a laptop",
    "a lemon tree in a terracotta pot on a balcony",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_FORMAT = 1


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts of a text file, one per line (blank lines and ``#`` comments skipped); never empty."""
    path = Path(path)
    if not path.is_file():
        raise DistillationError(f"prompt file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DistillationError(f"prompt file {path} is not UTF-8 text ({exc})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DistillationError(f"prompt file {path} holds no prompts (one per line; blank lines and # comments "
                                "are skipped)")
    return prompts


def list_images(directory: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) of every image in ``directory``, sorted; the caption is ``<stem>.txt`` or ""."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DistillationError(f"data directory {directory} does not exist")
    images = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DistillationError(f"data directory {directory} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    found = []
    for image in images:
        caption = image.with_suffix(".txt")
        found.append((image, caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""))
    return found


def split_held_out(items: list, eval_count: int) -> tuple[list, list, bool]:
    """(training items, held-out items, whether they are disjoint): every 10th prompt or image is held out
    (at least one from 5 items on, at most ``eval_count``); shorter lists are evaluated on their own items
    with other seeds and timesteps."""
    if len(items) < 5:
        return list(items), list(items), False
    held = min(eval_count, max(1, len(items) // 10))
    step = len(items) // held
    eval_idx = {i * step + step - 1 for i in range(held)}
    return [x for i, x in enumerate(items) if i not in eval_idx], [items[i] for i in sorted(eval_idx)], True


# ---------------------------------------------------------------------------------------------- data set
@dataclass
class Bucket:
    """Samples of one resolution: packed clean latents (n, tokens, channels) and their prompt rows (n,)."""

    height: int  # token grid
    width: int
    latents: torch.Tensor
    prompt_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.latents.shape[0])


@dataclass
class DataSet:
    """Prompt embeddings (one row per distinct prompt) and latents by resolution."""

    prompts: list[str]
    prompt_embeds: torch.Tensor  # (P, T, D)
    pooled_embeds: torch.Tensor  # (P, D')
    buckets: list[Bucket]
    description: dict = field(default_factory=dict)
    from_cache: bool = False

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"prompt_embeds": self.prompt_embeds.contiguous(), "pooled_embeds": self.pooled_embeds.contiguous()}
        for b in self.buckets:
            out[f"latents.{b.height}x{b.width}"] = b.latents.contiguous()
            out[f"prompt_index.{b.height}x{b.width}"] = b.prompt_index.contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prompts: list[str], description: dict) -> "DataSet":
        buckets = []
        for key in sorted(k for k in tensors if k.startswith("latents.")):
            grid = key.split(".", 1)[1]
            h, w = (int(v) for v in grid.split("x"))
            buckets.append(Bucket(h, w, tensors[key], tensors[f"prompt_index.{grid}"]))
        return cls(prompts, tensors["prompt_embeds"], tensors["pooled_embeds"], buckets, description)


def cache_path(cache_dir: str | Path, kind: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **key}, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / f"{kind}-{digest[:20]}.safetensors"


def load_cached(path: Path) -> DataSet | None:
    """The data set cached at ``path`` (None when absent or unreadable, which means: build it again)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        data = DataSet.from_tensors(tensors, json.loads(meta["prompts"]), json.loads(meta["description"]))
    except Exception as exc:  # a truncated or foreign file: regenerate rather than fail
        logger.warning("ignoring unreadable data cache %s (%s)", path, exc)
        return None
    data.from_cache = True
    return data


def save_cached(path: Path, data: DataSet) -> None:
    import os

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu() for k, v in data.tensors().items()}, str(tmp),
              metadata={"format": "pt", "prompts": json.dumps(data.prompts, ensure_ascii=False),
                        "description": json.dumps(data.description, ensure_ascii=False)})
    os.replace(tmp, path)  # a crash mid-write leaves no half file under the real name


# ---------------------------------------------------------------------------------------------- building
def seed_of(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes and platforms, unlike ``hash``)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], *, max_sequence_length: int, device, batch_size: int = 8):
    """(prompt_embeds (P, T, D), pooled (P, D')) on the CPU, in the text encoders' output dtype.

    Prompts longer than the text encoders take are truncated as the pipeline does; one summary line
    says so instead of the pipeline's warning per batch.
    """
    tokenizer = getattr(pipe, "tokenizer_2", None)
    if tokenizer is not None:
        long = sum(len(tokenizer(p).input_ids) > max_sequence_length for p in prompts)
        if long:
            logger.warning("%d of %d prompts are longer than max_sequence_length=%d tokens and are truncated",
                           long, len(prompts), max_sequence_length)
    pipeline_logger = logging.getLogger(type(pipe).__module__)
    level = pipeline_logger.level
    pipeline_logger.setLevel(logging.ERROR)
    embeds, pooled = [], []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            e, p, _ = pipe.encode_prompt(chunk, prompt_2=chunk, device=device,
                                         max_sequence_length=max_sequence_length)
            embeds.append(e.cpu())
            pooled.append(p.cpu())
    finally:
        pipeline_logger.setLevel(level)
    return torch.cat(embeds), torch.cat(pooled)


def _assignments(count: int, n_prompts: int, resolutions) -> list[tuple[int, tuple[int, int]]]:
    """Sample i uses prompt i mod P; resolutions rotate so that each pass over the prompts shifts them by one
    (N = P x R samples give every prompt at every resolution)."""
    return [(i % n_prompts, tuple(resolutions[(i // n_prompts + i) % len(resolutions)])) for i in range(count)]


@torch.no_grad()
def self_generate(pipe, prompts: list[str], count: int, grids: list[tuple[int, int]], *, seed: int, steps: int,
                  guidance: float, max_sequence_length: int, device, batch_size: int, quiet,
                  tag: str = "train") -> DataSet:
    """``count`` latents generated by the teacher pipeline (full attention) for ``prompts`` at token ``grids``.

    Sample ``i`` starts from noise seeded by ``(seed, tag, i)`` (independent of batching and device).
    """
    from tqdm.auto import tqdm

    prompts = list(prompts[:count])  # fewer samples than prompts: the first ones
    accepted = inspect.signature(pipe.__call__).parameters
    embeds, pooled = encode_prompts(pipe, prompts, max_sequence_length=max_sequence_length, device=device)
    ppt = 2 * int(pipe.vae_scale_factor)
    channels = pipe.transformer.config.in_channels
    plan = _assignments(count, len(prompts), grids)
    buckets = []
    bar = tqdm(total=count, desc=f"generating {tag} latents", disable=quiet, leave=False)
    for grid in sorted({g for _, g in plan}):
        members = [i for i, (_, g) in enumerate(plan) if g == grid]
        latents = []
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            noise = torch.cat([torch.randn((1, grid[0] * grid[1], channels),
                                           generator=torch.Generator().manual_seed(seed_of(seed, tag, i)))
                               for i in chunk])
            rows = [plan[i][0] for i in chunk]
            height, width = grid[0] * ppt, grid[1] * ppt
            # Kontext-style pipelines rescale to max_area (about 1 MP) unless told the size is wanted
            extra = {"max_area": height * width} if "max_area" in accepted else {}
            out = pipe(prompt_embeds=embeds[rows].to(device), pooled_prompt_embeds=pooled[rows].to(device),
                       latents=noise.to(device=device, dtype=embeds.dtype), height=height, width=width,
                       num_inference_steps=steps, guidance_scale=guidance, output_type="latent", **extra).images
            latents.append(out.cpu())
            bar.update(len(chunk))
        buckets.append(Bucket(grid[0], grid[1], torch.cat(latents),
                              torch.tensor([plan[i][0] for i in members], dtype=torch.int64)))
    bar.close()
    return DataSet(list(prompts), embeds, pooled, buckets)


def _closest_grid(size: tuple[int, int], grids: list[tuple[int, int]]) -> tuple[int, int]:
    w, h = size
    return min(grids, key=lambda g: (abs(math.log((g[1] / g[0]) / (w / h))), -g[0] * g[1]))


@torch.no_grad()
def encode_images(pipe, images: list[tuple[Path, str]], grids: list[tuple[int, int]], *, max_sequence_length: int,
                  device, batch_size: int, quiet) -> DataSet:
    """Encode ``(image, caption)`` pairs with the pipeline's VAE at the training grid closest in aspect ratio
    (resized to cover it, centre-cropped); the VAE posterior mean is used (deterministic)."""
    from diffusers import FluxPipeline
    from PIL import Image, ImageOps
    from tqdm.auto import tqdm

    prompts = sorted({caption for _, caption in images})
    embeds, pooled = encode_prompts(pipe, prompts, max_sequence_length=max_sequence_length, device=device)
    ppt = 2 * int(pipe.vae_scale_factor)
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", 0.0) or 0.0
    scale = vae.config.scaling_factor
    by_grid: dict[tuple[int, int], list[tuple[torch.Tensor, int]]] = {}
    for path, caption in tqdm(images, desc="encoding images", disable=quiet, leave=False):
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                grid = _closest_grid(img.size, grids)
                img = ImageOps.fit(img, (grid[1] * ppt, grid[0] * ppt), Image.Resampling.BICUBIC)
        except OSError as exc:
            raise DistillationError(f"cannot read image {path}: {exc}") from None
        pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
        by_grid.setdefault(grid, []).append((pixels.permute(2, 0, 1).float() / 127.5 - 1.0, prompts.index(caption)))
    buckets = []
    for grid, items in sorted(by_grid.items()):
        latents = []
        for start in range(0, len(items), batch_size):
            pixels = torch.stack([p for p, _ in items[start:start + batch_size]]).to(device=device, dtype=vae.dtype)
            z = (vae.encode(pixels).latent_dist.mode() - shift) * scale
            latents.append(FluxPipeline._pack_latents(z, *z.shape).cpu())  # 2x2 patches -> tokens, as FLUX does
        buckets.append(Bucket(grid[0], grid[1], torch.cat(latents),
                              torch.tensor([i for _, i in items], dtype=torch.int64)))
    return DataSet(prompts, embeds, pooled, buckets)


# ---------------------------------------------------------------------------------------------- batches
@dataclass(frozen=True)
class Batch:
    """Which samples, which noise and which timesteps one micro-batch uses."""

    bucket: int
    index: torch.Tensor  # (B,) rows of the bucket
    timesteps: torch.Tensor  # (B,) uniform in [0, 1)
    noise: torch.Tensor  # (B, tokens, channels), float32


def _epoch_batches(data: DataSet, batch_size: int, seed: int, epoch: int) -> list[tuple[int, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed_of(seed, "epoch", epoch))
    batches = []
    for b, bucket in enumerate(data.buckets):
        order = torch.randperm(len(bucket), generator=gen)
        n_batches = math.ceil(len(bucket) / batch_size)
        wrapped = order.repeat(math.ceil(n_batches * batch_size / len(bucket)))  # the last batch wraps around
        batches += [(b, wrapped[i * batch_size:(i + 1) * batch_size]) for i in range(n_batches)]
    shuffle = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in shuffle]


def batches_per_epoch(data: DataSet, batch_size: int) -> int:
    return sum(math.ceil(len(b) / batch_size) for b in data.buckets)


def batch_for(data: DataSet, batch_size: int, seed: int, position: int) -> Batch:
    """The ``position``-th micro-batch of the run: a pure function of ``(seed, position)`` and the data."""
    per_epoch = batches_per_epoch(data, batch_size)
    bucket, index = _epoch_batches(data, batch_size, seed, position // per_epoch)[position % per_epoch]
    gen = torch.Generator().manual_seed(seed_of(seed, "noise", position))
    latents = data.buckets[bucket].latents
    timesteps = torch.rand(len(index), generator=gen)
    noise = torch.randn((len(index), *latents.shape[1:]), generator=gen)
    return Batch(bucket, index, timesteps, noise)


def eval_batches(data: DataSet, count: int, batch_size: int, seed: int) -> list[Batch]:
    """``count`` fixed evaluation items (cycling over the samples) with seeded noise and timesteps spread
    evenly over (0, 1), grouped into batches of one resolution."""
    items = []
    flat = [(b, i) for b, bucket in enumerate(data.buckets) for i in range(len(bucket))]
    for k in range(count):
        bucket, row = flat[k % len(flat)]
        items.append((bucket, row, (k + 0.5) / count, seed_of(seed, "eval", k)))
    batches = []
    for b in range(len(data.buckets)):
        mine = [item for item in items if item[0] == b]
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            shape = data.buckets[b].latents.shape[1:]
            noise = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s))
                               for *_, s in chunk])
            batches.append(Batch(b, torch.tensor([r for _, r, _, _ in chunk]),
                                 torch.tensor([t for _, _, t, _ in chunk], dtype=torch.float32), noise))
    return batches
