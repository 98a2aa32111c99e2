"""Rebuild every weight of the toy FLUX (``clear_adapters/toy/toy-weights``) from scratch, with fixed seeds.

    python examples/toy/train.py                       # every stage, into the package directory
    python examples/toy/train.py --stages transformer  # one stage again (it reads the earlier stages' output)
    python examples/toy/train.py --out /tmp/toy --quick   # a smoke run (a few steps per stage)

Stages, in order (each reads what the earlier ones wrote under ``--out``):

``text``         word-level CLIP and T5 tokenizers; tiny CLIP and T5 encoders, random and frozen
``vae``          a one-level AutoencoderKL (no downsampling: 32 px -> 32 x 32 x 4 latents), trained to reconstruct
``decoder``      the VAE decoder fine-tuned on every palette colour, ``cyan`` included (encoder frozen)
``transformer``  the FluxTransformer2DModel (~2.3 M parameters), flow matching on captioned scenes
``variant``      a fine-tune of the transformer that learns a new colour word (``cyan``)
``lora``         a rank-8 LoRA (attention and feed-forward layers): trigger word ``snowy`` = light background
``controlnet``   a FluxControlNetModel (1 double + 1 single block) following Canny edges of the shapes
``clear_r4``     the CLEAR adapter r=4 (registry ``toy/r4``, alias ``toy``), made with ``clear-adapters distill``
``clear_r2``     the same at r=2 (``toy/r2``)

Every stage writes fp16 safetensors, records wall and CPU time in ``training_log.json`` and is
deterministic for a given thread count (``--threads``, default 1): data, noise and timesteps of step k
come from a generator seeded with (stage seed, k). The stages after ``transformer`` only read the base
pipeline: ``--jobs 2`` runs them two at a time in separate processes (one thread each, the same results).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from clear_adapters.toy import data
from clear_adapters.toy.pipeline import HEIGHT, MAX_SEQUENCE_LENGTH, STEPS, WEIGHTS_DIR

STAGES = ("text", "vae", "decoder", "transformer", "variant", "lora", "controlnet", "clear_r4", "clear_r2")
#: Stages that only read the base pipeline: independent of each other (``--jobs`` runs them in parallel).
INDEPENDENT = ("controlnet", "clear_r4", "clear_r2", "variant", "lora")
SEED = 20241216  # CLEAR's arXiv date; every stage offsets it


# ------------------------------------------------------------------------------------------------ helpers
def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def step_generator(stage_seed: int, step: int) -> torch.Generator:
    """The generator of one training step: resuming or rerunning a stage replays the same data."""
    return torch.Generator().manual_seed(stage_seed * 1_000_003 + step)


def save_fp16(model, directory: Path) -> None:
    """``save_pretrained`` in fp16 (the shipped precision); the training copy stays float32."""
    copy.deepcopy(model).to(torch.float16).save_pretrained(str(directory), safe_serialization=True)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of parameters (samples from the average are cleaner than the last step)."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    @torch.no_grad()
    def update(self, model, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.named_parameters():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, model) -> None:
        for k, v in model.named_parameters():
            if k in self.shadow:
                v.copy_(self.shadow[k])


class Stage:
    """Wall and CPU time of one stage, appended to ``training_log.json``."""

    def __init__(self, out: Path, name: str):
        self.out, self.name = out, name

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        log(f"stage {self.name}: start")
        self.metrics: dict = {}
        return self

    def __exit__(self, kind, value, tb):
        if kind is not None:
            return False
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        path = self.out / "training_log.json"
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        with open(self.out / ".training_log.lock", "w") as lock:  # stages may run in parallel processes
            try:
                import fcntl

                fcntl.flock(lock, fcntl.LOCK_EX)
            except ImportError:  # pragma: no cover - not on POSIX: stages run one after another there
                pass
            record = json.loads(path.read_text()) if path.is_file() else {}
            record[self.name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "threads": torch.get_num_threads(),
                                 "load_average_at_end": load, **self.metrics}
            path.write_text(json.dumps(record, indent=2) + "\n")
        log(f"stage {self.name}: done in {wall:.0f} s wall, {cpu:.0f} s CPU {self.metrics}")
        return False


def pipeline_dir(out: Path) -> Path:
    return out / "pipeline"


# ------------------------------------------------------------------------------------------------ text
def word_tokenizers(words):
    """(CLIPTokenizer, T5TokenizerFast) that keep every word of ``words`` as one token (pieces otherwise)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer, T5TokenizerFast

    letters = sorted({ch for w in words for ch in w} | set("abcdefghijklmnopqrstuvwxyz"))
    # CLIP is byte-pair encoding: merges learned on the word list itself (deterministic) end in one
    # token per word; hand-written merge chains of different words derail each other.
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(list(words), trainers.BpeTrainer(
        vocab_size=10 * len(words) + 100, special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>", initial_alphabet=letters, show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    clip = CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=MAX_SEQUENCE_LENGTH,
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                         pad_token="<|endoftext|>")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in words] + [(ch, -100.0) for ch in letters] + [("\u2581", -50.0)]
    t5 = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)
    return clip, t5


def stage_text(out: Path, quick: bool) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with Stage(out, "text") as stage:
        clip_tok, t5_tok = word_tokenizers(data.VOCABULARY)
        for tok in (clip_tok, t5_tok):
            bad = [w for w in data.VOCABULARY if len(tok.tokenize(w)) != 1]
            assert not bad, f"{type(tok).__name__} splits {bad}"  # one token per caption word
        torch.manual_seed(SEED + 1)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            projection_dim=32, max_position_embeddings=MAX_SEQUENCE_LENGTH, bos_token_id=0, eos_token_id=1,
            pad_token_id=1)).eval()
        torch.manual_seed(SEED + 2)
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=64, d_ff=128, d_kv=16, num_layers=1, num_heads=4,
                                     dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                                     eos_token_id=1)).eval()
        target = pipeline_dir(out)
        clip_tok.save_pretrained(str(target / "tokenizer"))
        t5_tok.save_pretrained(str(target / "tokenizer_2"))
        save_fp16(clip, target / "text_encoder")
        save_fp16(t5, target / "text_encoder_2")
        stage.metrics["vocabulary"] = len(data.VOCABULARY)


# ------------------------------------------------------------------------------------------------ components
def load_text(out: Path):
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    target = pipeline_dir(out)
    return {"tokenizer": CLIPTokenizer.from_pretrained(str(target / "tokenizer")),
            "tokenizer_2": T5TokenizerFast.from_pretrained(str(target / "tokenizer_2")),
            "text_encoder": CLIPTextModel.from_pretrained(str(target / "text_encoder"),
                                                          torch_dtype=torch.float32).eval(),
            "text_encoder_2": T5EncoderModel.from_pretrained(str(target / "text_encoder_2"),
                                                             torch_dtype=torch.float32).eval()}


class TextEncoder:
    """Caption -> (T5 tokens, CLIP pooled) exactly as FluxPipeline.encode_prompt computes them, cached."""

    def __init__(self, components: dict):
        from diffusers import FluxPipeline

        self.pipe = FluxPipeline(scheduler=None, vae=None, transformer=None, **components)
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted({c for c in captions if c not in self.cache})
        if missing:
            embeds, pooled, _ = self.pipe.encode_prompt(missing, prompt_2=None, device="cpu",
                                                        max_sequence_length=MAX_SEQUENCE_LENGTH)
            for i, c in enumerate(missing):
                self.cache[c] = (embeds[i], pooled[i])
        return (torch.stack([self.cache[c][0] for c in captions]), torch.stack([self.cache[c][1] for c in captions]))


def vae_config() -> dict:
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                up_block_types=("UpDecoderBlock2D",), block_out_channels=(16,), layers_per_block=1, latent_channels=4,
                norm_num_groups=4, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False)


def load_vae(out: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(pipeline_dir(out) / "vae"), torch_dtype=torch.float32).eval()


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> normalised latents (what FluxPipeline's VAE decode undoes)."""
    latents = vae.encode(images * 2 - 1).latent_dist.mode()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


# ------------------------------------------------------------------------------------------------ vae
def stage_vae(out: Path, quick: bool) -> None:
    from diffusers import AutoencoderKL

    with Stage(out, "vae") as stage:
        torch.manual_seed(SEED + 10)
        vae = AutoencoderKL(**vae_config()).train()
        steps, batch = (5, 8) if quick else (VAE_STEPS, 16)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
        for step in range(steps):
            gen = step_generator(SEED + 10, step)
            scenes = [data.random_scene(gen) for _ in range(batch)]
            if step % 2:  # half the batches in the LoRA's look, so both backgrounds reconstruct well
                scenes = [data.with_trigger(s) for s in scenes]
            images = data.render_batch(scenes) * 2 - 1
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, 2e-3, 50)
            posterior = vae.encode(images).latent_dist
            recon = vae.decode(posterior.sample(generator=gen)).sample
            # A whisper of KL: latents stay near-deterministic (pipelines may sample them) and sharp.
            kl = posterior.kl().mean() / images[0].numel()
            loss = F.mse_loss(recon, images) + F.l1_loss(recon, images) + 1e-6 * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 25 == 0 or step == steps - 1:
                log(f"vae step {step}/{steps} loss {loss.item():.4f}")
        vae.eval()
        # Latent normalisation like FLUX's VAE config: (z - shift) * scale has zero mean, unit variance.
        with torch.no_grad():
            gen = torch.Generator().manual_seed(SEED + 11)
            scenes = [data.random_scene(gen) for _ in range(256)]
            images = data.render_batch(scenes)
            latents = vae.encode(images * 2 - 1).latent_dist.mode()
            shift, scale = float(latents.mean()), float(1.0 / latents.std())
            vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(scale, 4))
            recon = (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
            psnr = float(10 * torch.log10(1 / F.mse_loss(recon, images)))
        save_fp16(vae, pipeline_dir(out) / "vae")
        stage.metrics.update(reconstruction_psnr_db=round(psnr, 2), shift_factor=shift, scaling_factor=scale)


def stage_decoder(out: Path, quick: bool) -> None:
    """The decoder learns the variant's colour too; the encoder -- the latent space every later stage
    trains in -- stays as the ``vae`` stage left it. (A VAE trained on the six base colours decodes cyan
    as a dull green-blue, which no fine-tune of the transformer can fix: FLUX variants share the VAE.)"""
    with Stage(out, "decoder") as stage:
        seed = SEED + 12
        vae = load_vae(out)
        vae.requires_grad_(False)
        vae.decoder.requires_grad_(True)
        vae.decoder.train()
        params = [p for p in vae.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        steps, batch = (3, 8) if quick else (DECODER_STEPS, 16)
        colours = tuple(data.VARIANT_COLOURS)
        for step in range(steps):
            gen = step_generator(seed, step)
            scenes = [data.random_scene(gen, colours=colours) for _ in range(batch)]
            if step % 2:
                scenes = [data.with_trigger(s) for s in scenes]
            images = data.render_batch(scenes) * 2 - 1
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, 1e-3, 20)
            with torch.no_grad():
                latents = vae.encode(images).latent_dist.sample(generator=gen)
            recon = vae.decode(latents).sample
            loss = F.mse_loss(recon, images) + F.l1_loss(recon, images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 25 == 0 or step == steps - 1:
                log(f"decoder step {step}/{steps} loss {loss.item():.4f}")
        vae.eval()
        with torch.no_grad():
            metrics = {}
            for name, palette in (("reconstruction_psnr_db", tuple(data.COLOURS)),
                                  ("reconstruction_psnr_db_with_cyan", colours)):
                gen = torch.Generator().manual_seed(SEED + 11)
                images = data.render_batch([data.random_scene(gen, colours=palette) for _ in range(256)])
                recon = (vae.decode(vae.encode(images * 2 - 1).latent_dist.mode()).sample / 2 + 0.5).clamp(0, 1)
                metrics[name] = round(float(10 * torch.log10(1 / F.mse_loss(recon, images))), 2)
        save_fp16(vae, pipeline_dir(out) / "vae")
        stage.metrics.update(steps=steps, batch=batch, **metrics)


# ------------------------------------------------------------------------------------------------ transformer
def transformer_config() -> dict:
    # 4 heads x 32 = 128 channels, 2 double + 4 single blocks: ~2.3 M parameters. No guidance embedding
    # (nothing to distil guidance from); rope axes (frame, row, column) sum to the head dimension.
    return dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32,
                num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=False,
                axes_dims_rope=(8, 12, 12))


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1-dev's scheduler settings: at 16 x 16 tokens the dynamic shift is exp(0.5).
    return FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                           max_shift=1.15, num_train_timesteps=1000, shift=3.0,
                                           use_dynamic_shifting=True)


def sample_sigmas(batch: int, gen: torch.Generator) -> torch.Tensor:
    """Logit-normal noise levels, shifted as the pipeline shifts its sampling schedule at 256 tokens."""
    u = torch.sigmoid(torch.randn(batch, generator=gen))
    shift = math.exp(0.5)
    return shift * u / (1 + (shift - 1) * u)


class FlowData:
    """Turns scenes into flow-matching batches (packed latents, text, ids) for FLUX-shaped models."""

    def __init__(self, vae, text: TextEncoder):
        from diffusers import FluxPipeline

        self.vae, self.text = vae, text
        self.pack = FluxPipeline._pack_latents
        side = HEIGHT // 2
        self.img_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)
        self.txt_ids = torch.zeros(MAX_SEQUENCE_LENGTH, 3)

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        z = encode_images(self.vae, images)
        return self.pack(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3])

    def batch(self, scenes, gen: torch.Generator, images: torch.Tensor | None = None) -> dict:
        x0 = self.latents(data.render_batch(scenes) if images is None else images)
        embeds, pooled = self.text([s.caption for s in scenes])
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(len(scenes), gen)
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        return {"inputs": dict(hidden_states=xt, timestep=sigma, pooled_projections=pooled,
                               encoder_hidden_states=embeds, txt_ids=self.txt_ids, img_ids=self.img_ids,
                               return_dict=False),
                "target": noise - x0, "sigma": sigma}


def flow_loss(model, batch: dict, **extra) -> torch.Tensor:
    prediction = model(**batch["inputs"], **extra)[0]
    return F.mse_loss(prediction, batch["target"])


def build_pipeline(out: Path, transformer, vae=None):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=scheduler(), vae=vae or load_vae(out), transformer=transformer, **load_text(out))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(out: Path, transformer, directory: Path):
    """Save a whole toy pipeline around ``transformer`` in fp16; returns it in float32 (fp16-rounded weights)."""
    transformer = copy.deepcopy(transformer).eval().to(torch.float16)
    pipe = build_pipeline(out, transformer)
    pipe.to(torch.float16).save_pretrained(str(directory), safe_serialization=True)
    return pipe.to(torch.float32)


@torch.no_grad()
def placement_score(pipe, count: int = 36, seed: int = 0, steps: int = STEPS) -> float:
    """Full attention: fraction of single-object prompts drawn in the right colour and 3 x 3 cell."""
    from clear_adapters.toy import detector

    scenes = data.single_object_prompts(count, seed)
    images = pipe([s.caption for s in scenes], height=HEIGHT, width=HEIGHT, num_inference_steps=steps,
                  max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="pt",
                  generator=torch.Generator().manual_seed(seed)).images
    return sum(detector.placed_right(im, s) for im, s in zip(images, scenes)) / len(scenes)


def train_loop(name: str, model, params, make_batch, steps: int, lr: float, out: Path, *, warmup: int = 50,
               ema_decay: float | None = 0.995, loss_fn=flow_loss, checkpoint_every: int = 0, weight_decay=0.0,
               lr_floor: float = 0.1):
    """AdamW, warm-up then cosine decay to ``lr_floor`` x ``lr`` (+ EMA) over batches ``make_batch(step)``.

    ``lr_floor=1`` keeps the rate constant after warm-up: the first N steps are then the same whatever
    ``steps`` is, so a run can be extended (and the EMA does the annealing). Resumable from checkpoints.
    """
    from safetensors.torch import load_file, save_file

    params = list(params)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    ema = EMA(model, ema_decay) if ema_decay else None
    checkpoint = out / "_work" / f"{name}.safetensors"
    start = 0
    if checkpoint_every and checkpoint.is_file():  # resume: parameters, EMA and Adam moments (no pickle)
        saved = load_file(str(checkpoint))
        with torch.no_grad():
            for p in params:
                n = names[id(p)]
                p.copy_(saved[f"param.{n}"])
                optimizer.state[p] = {"step": saved["step"].clone().float(), "exp_avg": saved[f"m.{n}"],
                                      "exp_avg_sq": saved[f"v.{n}"]}
                if ema is not None:
                    ema.shadow[n] = saved[f"ema.{n}"]
        start = int(saved["step"])
        log(f"{name}: resumed at step {start}")
    running = None
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup, lr_floor)
        loss = loss_fn(model, make_batch(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if ema is not None:
            ema.update(model, step)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 25 == 0 or step == steps - 1:
            log(f"{name} step {step}/{steps} loss {loss.item():.4f} (smoothed {running:.4f})")
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tensors = {"step": torch.tensor(step + 1)}
            for p in params:
                n = names[id(p)]
                tensors[f"param.{n}"] = p.detach().clone()
                tensors[f"m.{n}"] = optimizer.state[p]["exp_avg"].clone()
                tensors[f"v.{n}"] = optimizer.state[p]["exp_avg_sq"].clone()
                if ema is not None:
                    tensors[f"ema.{n}"] = ema.shadow[n].clone()
            save_file(tensors, str(checkpoint) + ".tmp")
            os.replace(str(checkpoint) + ".tmp", checkpoint)
    if ema is not None:
        ema.copy_to(model)
    if checkpoint.is_file():
        checkpoint.unlink()
    return running


def stage_transformer(out: Path, quick: bool) -> None:
    from diffusers import FluxTransformer2DModel

    with Stage(out, "transformer") as stage:
        seed = SEED + 20
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(**transformer_config()).train()
        flow = FlowData(load_vae(out), TextEncoder(load_text(out)))
        steps, batch = (3, 4) if quick else (TRANSFORMER_STEPS, 16)

        def make_batch(step):
            gen = step_generator(seed, step)
            return flow.batch([data.random_scene(gen) for _ in range(batch)], gen)

        stage.metrics["final_loss"] = train_loop("transformer", model, model.parameters(), make_batch, steps, 1e-3, out,
                                                 warmup=100, checkpoint_every=0 if quick else 50, lr_floor=1.0,
                                                 ema_decay=0.99)
        model.eval()
        stage.metrics.update(parameters=sum(p.numel() for p in model.parameters()), steps=steps, batch=batch)
        pipe = save_pipeline(out, model, pipeline_dir(out))
        if not quick:
            stage.metrics["placement_score_full_attention"] = placement_score(pipe)


TRANSFORMER_STEPS = 2000  # constant rate: stopped where the toy was good enough, see docs/TOY.md


# ------------------------------------------------------------------------------------------------ plugins
def load_transformer(out: Path, name: str = "pipeline"):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(str(out / name / "transformer"), torch_dtype=torch.float32)


def base_flow(out: Path) -> FlowData:
    return FlowData(load_vae(out), TextEncoder(load_text(out)))


def stage_variant(out: Path, quick: bool) -> None:
    """Full fine-tune (every weight, like FLUX.1-Krea-dev is of FLUX.1-dev) that learns ``cyan``."""
    with Stage(out, "variant") as stage:
        seed = SEED + 30
        model = load_transformer(out).train()
        flow = base_flow(out)
        steps, batch = (3, 4) if quick else (VARIANT_STEPS, 16)
        colours = tuple(data.VARIANT_COLOURS)

        def make_batch(step):
            gen = step_generator(seed, step)
            scenes = []
            for i in range(batch):  # half the batch has the new colour, the rest keeps what the base knows
                if i % 2 == 0:
                    scene = data.random_scene(gen, colours=colours, empty_caption=0.0)
                    while data.VARIANT_COLOUR not in scene.caption:
                        scene = data.random_scene(gen, colours=colours, empty_caption=0.0)
                else:
                    scene = data.random_scene(gen)
                scenes.append(scene)
            return flow.batch(scenes, gen)

        # A short EMA: with 0.995 over a few hundred steps the average still leans on the first ones, and
        # the new word came out half-learned (between green and blue).
        stage.metrics["final_loss"] = train_loop("variant", model, model.parameters(), make_batch, steps, 5e-4, out,
                                                 warmup=20, ema_decay=0.98)
        pipe = save_pipeline(out, model.eval(), out / "variant")
        stage.metrics.update(steps=steps, batch=batch)
        if not quick:
            from clear_adapters.toy import detector

            scenes = data.colour_scenes(data.VARIANT_COLOUR, 18)
            images = pipe([s.caption for s in scenes], height=HEIGHT, width=HEIGHT, num_inference_steps=STEPS,
                          max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="pt",
                          generator=torch.Generator().manual_seed(0)).images
            stage.metrics["cyan_placed_right"] = sum(detector.placed_right(im, s) for im, s in zip(images, scenes)) / 18
            stage.metrics["placement_score_full_attention"] = placement_score(pipe)


LORA_RANK = 16
# Attention and feed-forward of every block: with attention alone (rank 8, 250 steps) the light background
# came but the shapes were washed out of it (loss still 5x the base model's).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_mlp", "proj_out"]


def stage_lora(out: Path, quick: bool) -> None:
    """A LoRA on the attention and feed-forward layers: ``snowy`` in the caption gives a light background."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    with Stage(out, "lora") as stage:
        seed = SEED + 40
        model = load_transformer(out)
        model.requires_grad_(False)
        torch.manual_seed(seed)
        model.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=LORA_TARGETS,
                                     init_lora_weights="gaussian"))
        model.train()
        flow = base_flow(out)
        steps, batch = (3, 4) if quick else (LORA_STEPS, 16)

        def make_batch(step):
            gen = step_generator(seed, step)
            # 3 in 4 with the trigger; the rest without it and unchanged, so the trigger word carries the effect
            scenes = [data.random_scene(gen, empty_caption=0.0) for _ in range(batch)]
            scenes = [data.with_trigger(s) if i % 4 else s for i, s in enumerate(scenes)]
            return flow.batch(scenes, gen)

        params = [p for p in model.parameters() if p.requires_grad]
        stage.metrics["final_loss"] = train_loop("lora", model, params, make_batch, steps, 2e-3, out, warmup=20,
                                                 ema_decay=None)
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(model).items()}
        FluxPipeline.save_lora_weights(str(out / "lora"), transformer_lora_layers=state)
        stage.metrics.update(steps=steps, batch=batch, rank=LORA_RANK, trainable=sum(p.numel() for p in params))


def control_condition(scene) -> torch.Tensor:
    """The ControlNet's condition for ``scene`` (the matrix's, so training and checks agree) as [0, 1] RGB."""
    from clear_adapters.imaging import as_tensor
    from clear_adapters.integrations.toy import control_image

    return as_tensor(control_image(scene))


def drop_unexpected_config(path: Path, cls) -> None:
    """Remove config keys ``cls`` does not take (``from_transformer`` copies ``out_channels``), so loading
    the shipped model prints no "attributes ... will be ignored" warning."""
    import inspect

    config = json.loads(path.read_text())
    accepted = set(inspect.signature(cls.__init__).parameters)
    config = {k: v for k, v in config.items() if k.startswith("_") or k in accepted}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def stage_controlnet(out: Path, quick: bool) -> None:
    """A FluxControlNetModel (1 double + 1 single block, from the transformer) that follows Canny edges."""
    from diffusers import FluxControlNetModel

    with Stage(out, "controlnet") as stage:
        seed = SEED + 50
        transformer = load_transformer(out).eval()
        transformer.requires_grad_(False)
        torch.manual_seed(seed)
        net = FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                                   attention_head_dim=transformer.config.attention_head_dim,
                                                   num_attention_heads=transformer.config.num_attention_heads).train()
        flow = base_flow(out)
        steps, batch = (3, 4) if quick else (CONTROLNET_STEPS, 16)

        def make_batch(step):
            gen = step_generator(seed, step)
            scenes = [data.random_scene(gen, empty_caption=0.0) for _ in range(batch)]
            conditions = torch.stack([control_condition(s) for s in scenes])
            result = flow.batch([data.without_positions(s) for s in scenes], gen,
                                images=data.render_batch(scenes))
            with torch.no_grad():  # as FluxControlNetPipeline prepares the control image
                z = flow.vae.encode(conditions * 2 - 1).latent_dist.sample(generator=gen)
                z = (z - flow.vae.config.shift_factor) * flow.vae.config.scaling_factor
                result["control"] = flow.pack(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3])
            return result

        def loss_fn(model, batch_data):
            inputs = batch_data["inputs"]
            blocks, singles = net(controlnet_cond=batch_data["control"], conditioning_scale=1.0, **inputs)
            prediction = transformer(**inputs, controlnet_block_samples=blocks,
                                     controlnet_single_block_samples=singles)[0]
            return F.mse_loss(prediction, batch_data["target"])

        stage.metrics["final_loss"] = train_loop("controlnet", net, net.parameters(), make_batch, steps, 5e-4, out,
                                                 warmup=20, loss_fn=loss_fn)
        save_fp16(net.eval(), out / "controlnet")
        drop_unexpected_config(out / "controlnet" / "config.json", FluxControlNetModel)
        stage.metrics.update(steps=steps, batch=batch, parameters=sum(p.numel() for p in net.parameters()))


# ------------------------------------------------------------------------------------------------ CLEAR
def distill_argv(out: Path, window: int, quick: bool) -> list[str]:
    """The ``clear-adapters distill`` command line of one shipped adapter: the CLI's ``toy`` preset,
    spelled out (the base here is the pipeline directory under ``--out``, not the installed toy)."""
    from clear_adapters.commands.distill import PRESETS

    preset = dict(PRESETS["toy"])
    if quick:
        preset.update(steps=2, samples=32, eval_samples=4, checkpoint_every=1)
    flags = {"steps": "--steps", "batch_size": "--batch", "lr": "--lr", "samples": "--self-generate",
             "eval_samples": "--eval-samples", "generation_steps": "--generation-steps",
             "max_sequence_length": "--max-sequence-length", "checkpoint_every": "--checkpoint-every"}
    argv = ["distill", "--base", str(pipeline_dir(out)), "--window", str(window), "--out",
            str(out / f"clear-r{window}"), "--prompts", str(out / "_work" / "distill_prompts.txt"),
            "--seed", str(SEED + 70 + window), "--overwrite", "--quiet", "--threads", str(torch.get_num_threads())]
    for (height, width) in preset.pop("resolution"):
        argv += ["--resolution", str(height), str(width)]
    if not preset.pop("gradient_checkpointing", True):
        argv.append("--no-gradient-checkpointing")
    for key, value in preset.items():
        argv += [flags[key], str(value)]
    return argv


def to_fp16_adapter(directory: Path) -> None:
    """Store an adapter's weights in fp16 (the toy's shipped precision); its config's sha256 follows."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from clear_adapters.artifact import _canonicalize_header, config_bytes
    from clear_adapters.hub import file_sha256

    config_path = directory / "clear_config.json"
    config = json.loads(config_path.read_text())
    weights = directory / config["weights"]
    with safe_open(str(weights), framework="pt") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k).to(torch.float16).contiguous() for k in fh.keys()}
    save_file(tensors, str(weights), metadata=metadata)
    _canonicalize_header(weights)  # the same bytes on every rebuild (safetensors writes metadata in hash order)
    config["sha256"] = file_sha256(weights)
    config_path.write_bytes(config_bytes(config))


def stage_clear(out: Path, quick: bool, window: int) -> None:
    """``clear-adapters distill`` against the base toy; the directory is then trimmed to what ships."""
    from clear_adapters.artifact import check_adapter_dir
    from clear_adapters.cli import main as cli
    from clear_adapters.toy.data import distill_prompts

    with Stage(out, f"clear_r{window}") as stage:
        prompts = out / "_work" / "distill_prompts.txt"
        prompts.parent.mkdir(parents=True, exist_ok=True)
        # always written (a stale list must not be reused); atomically, as clear_r4 and clear_r2 may run at once
        scratch = prompts.with_name(f"{prompts.name}.{os.getpid()}")
        scratch.write_text("\n".join(distill_prompts()) + "\n")
        os.replace(scratch, prompts)
        argv = distill_argv(out, window, quick)
        log("clear-adapters " + " ".join(argv))
        if cli(argv) != 0:
            raise SystemExit(f"clear-adapters distill failed for r={window}")
        target = out / f"clear-r{window}"
        report = json.loads((target / "report.json").read_text())
        for extra in ("checkpoint", "cache"):
            shutil.rmtree(target / extra, ignore_errors=True)
        (target / "loss.png").unlink(missing_ok=True)
        report.pop("loss_history", None)  # the shipped report keeps the numbers, not every step
        (target / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        to_fp16_adapter(target)
        # the card was written for a directory on this machine: it names the registry entry instead
        card = target / "README.md"
        card.write_text(card.read_text().replace(str(target), f"toy/r{window}"))
        check_adapter_dir(target)  # the shipped directory is a valid adapter (config, sha256, tensors)
        stage.metrics.update(window=window, steps=report["steps"], error_before=report["error_before"],
                             error_after=report["error_after"], error_reduction=report["error_reduction"],
                             command="clear-adapters " + " ".join(argv).replace(str(out), "<out>"))


def stage_clear_r4(out: Path, quick: bool) -> None:
    stage_clear(out, quick, 4)


def stage_clear_r2(out: Path, quick: bool) -> None:
    stage_clear(out, quick, 2)


VAE_STEPS = 800
DECODER_STEPS = 300
VARIANT_STEPS = 400
LORA_STEPS = 500
CONTROLNET_STEPS = 300


# ------------------------------------------------------------------------------------------------ main
def scrub_build_paths(out: Path) -> None:
    """Drop ``_name_or_path`` entries that hold this machine's paths from the shipped configs
    (diffusers records where a model was loaded from; a wheel should not carry the build directory)."""
    for path in out.rglob("config.json"):
        if "_work" in path.parts:
            continue
        config = json.loads(path.read_text())
        if os.path.isabs(str(config.get("_name_or_path", ""))):
            del config["_name_or_path"]
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def run_parallel(stages: list[str], args, out: Path) -> None:
    """Each stage in its own process (``--stages NAME``), ``args.jobs`` at a time; logs under ``out/_work``."""
    import subprocess

    pending, running, failed = list(stages), [], []
    (out / "_work").mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            command = [sys.executable, __file__, "--stages", name, "--out", str(out), "--threads", str(args.threads)]
            command += ["--quick"] if args.quick else []
            logfile = open(out / "_work" / f"{name}.log", "w")
            log(f"started stage {name} in a process of its own (log: {logfile.name})")
            running.append((name, subprocess.Popen(command, stdout=logfile, stderr=subprocess.STDOUT), logfile))
        time.sleep(1)
        for item in list(running):
            name, process, logfile = item
            if process.poll() is not None:
                running.remove(item)
                logfile.close()
                log(f"stage {name}: process exited with {process.returncode}")
                if process.returncode:
                    failed.append(name)
    if failed:
        raise SystemExit(f"stage(s) failed: {', '.join(failed)}; see their logs in {out / '_work'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="weights directory (default: the package's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; results depend on it (the shipped weights: 1, see docs/TOY.md)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage: checks the script, not the toy")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run up to N of the stages after 'transformer' at once, in separate processes")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parallel = [s for s in INDEPENDENT if s in stages] if args.jobs > 1 else []
    for name in STAGES:
        if name in stages and name not in parallel:
            globals()[f"stage_{name}"](out, args.quick)
    if parallel:
        run_parallel(parallel, args, out)
    scrub_build_paths(out)
    if not any((out / "_work").glob("*")):
        shutil.rmtree(out / "_work", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
