"""Distillation (``clear_adapters.distill`` / ``clear-adapters distill``) on the tiny random pipeline.

The tiny pipeline has random weights: these tests prove the mechanics (the student gets closer to the
teacher on held-out inputs, resume is exact, weights are shared, the output is a normal adapter), not
the fidelity of a distilled model.
"""

from __future__ import annotations

import gc
import hashlib
import json
import sys
import uuid

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from safetensors.torch import load_file

import clear_adapters
from clear_adapters import ClearAdapterError, IncompatibleModelError
from clear_adapters import distill_data as data_mod
from clear_adapters.artifact import check_adapter_dir, read_config
from clear_adapters.cli import main
from clear_adapters.distill import Distiller, DistillSettings, _image_ids, distill
from clear_adapters.errors import DistillationError
from clear_adapters.testing import tiny_flux_pipeline, tiny_test_image

# tiny models are overhead-bound: one torch thread is faster than two contending ones
pytestmark = pytest.mark.usefixtures("single_thread")

#: small settings for the library-level tests (the CLI test uses the `tiny` preset)
SMALL = dict(resolution=[(64, 64)], batch_size=2, lr=3e-3, loss_weights=(0.0, 1.0, 0.5), samples=4, eval_samples=2,
             generation_steps=2, max_sequence_length=16, checkpoint_every=100, gradient_checkpointing=False)
PROMPTS = ["a red house", "a blue sky", "a green tree", "a cat at night"]


def digests(pipe) -> dict[str, str]:
    """sha256 of every parameter and buffer of every model in the pipeline (no copies kept)."""
    out = {}
    for component, model in pipe.components.items():
        if isinstance(model, torch.nn.Module):
            for kind, items in (("p", model.named_parameters()), ("b", model.named_buffers())):
                for name, t in items:
                    data = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                    out[f"{component}.{kind}.{name}"] = hashlib.sha256(data).hexdigest()
    return out


def transformer_output(pipe, seed: int = 3) -> torch.Tensor:
    """The transformer's prediction on fixed random inputs (16x16 tokens, 16 text tokens)."""
    gen = torch.Generator().manual_seed(seed)
    tr = pipe.transformer
    with torch.no_grad():
        return tr(hidden_states=torch.randn(1, 256, tr.config.in_channels, generator=gen),
                  timestep=torch.tensor([0.6]), guidance=torch.tensor([3.5]),
                  pooled_projections=torch.randn(1, tr.config.pooled_projection_dim, generator=gen),
                  encoder_hidden_states=torch.randn(1, 16, tr.config.joint_attention_dim, generator=gen),
                  txt_ids=torch.zeros(16, 3), img_ids=_image_ids(16, 16, "cpu", torch.float32), return_dict=False)[0]


# ------------------------------------------------------------------------------------------ the CLI run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`clear-adapters distill --base tiny --window 2 --out DIR`, run once for the tests of this module."""
    out = tmp_path_factory.mktemp("distill") / "tiny-r2"
    code = main(["distill", "--base", "tiny", "--window", "2", "--out", str(out)])
    return out, code


@pytest.mark.timeout(240)
def test_cli_tiny_run_brings_student_30_percent_closer_to_teacher(tiny_run):
    out, code = tiny_run
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["error_after"] <= 0.7 * report["error_before"], report["error_reduction"]
    assert report["steps"] == 40 and report["settings"]["window_size"] == 2
    assert report["wall_time_s"] > 0 and report["seconds_per_step"] > 0
    assert set(report["final_loss"]) == {"total", "fm", "pred", "attn"}
    assert all(v is not None and v >= 0 for v in report["final_loss"].values())
    assert report["resolved"]["pixels_per_token"] == 4 and report["resolved"]["max_sequence_length"] == 64
    assert report["data"]["source"] == "self-generated" and not report["data"]["from_cache"]
    assert report["eval"]["held_out_inputs"] is True
    assert len(report["loss_history"]) == 40
    from PIL import Image

    with Image.open(out / "loss.png") as plot:
        assert plot.format == "PNG" and plot.size == (720, 420)
        assert len(plot.convert("RGB").getcolors(maxcolors=1 << 20)) > 20  # curves, not a blank canvas
    config, weights = check_adapter_dir(out)  # what push checks: config <-> weights <-> sha256 <-> layout
    assert config["window_size"] == 2 and config["down_factor"] == 1 and config["weight_mode"] == "replace"
    assert config["trained_resolution"] == [64, 64]
    assert config["provenance"]["base"] == "tiny" and config["provenance"]["steps"] == 40
    assert config["provenance"]["error_after"] == report["error_after"]
    keys = load_file(str(weights)).keys()
    assert all(k.rsplit(".", 1)[0].endswith(("to_q", "to_k", "to_v", "to_out.0")) for k in keys)
    assert len(keys) == 2 * (2 * 4 + 2 * 3)  # weight + bias; 2 double blocks x 4 projections, 2 single x 3


@pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")
def test_cli_output_loads_and_round_trips_through_push(tiny_run, hub_server):
    out, _ = tiny_run
    pipe = tiny_flux_pipeline()
    full = transformer_output(pipe)
    clear_adapters.load(out, pipe)
    local = transformer_output(pipe)
    clear_adapters.unload(pipe)
    assert not torch.allclose(local, full, atol=1e-4)  # the adapter changes the model

    repo = f"tester/clear-tiny-distilled-{uuid.uuid4().hex[:8]}"
    result = clear_adapters.push(out, repo)
    assert result.changed
    from huggingface_hub import hf_hub_download

    card = open(hf_hub_download(repo, "README.md")).read()
    assert "## Provenance" in card and "clear-adapters distill" in card and "base: tiny" in card
    assert "error_before" in card
    clear_adapters.load(repo, pipe)
    assert torch.equal(transformer_output(pipe), local)
    clear_adapters.unload(pipe)
    assert torch.equal(transformer_output(pipe), full)


# ------------------------------------------------------------------------------------------ sharing
def storage_copies(params: dict[str, torch.Tensor]) -> dict[str, int]:
    """For each tensor, how many distinct storages anywhere in the process hold a tensor equal to it."""
    import warnings

    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some torch objects warns about deprecated aliases
        warnings.simplefilter("ignore")
        # plain tensors and parameters hold real storage (fake/functional tensors left by earlier
        # torch.compile runs in the same process have symbolic shapes and no data)
        live = [o for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter)]
    by_shape: dict = {}
    for t in live:
        try:
            key = (tuple(int(n) for n in t.shape), t.dtype)
            t.untyped_storage()
        except (TypeError, RuntimeError, NotImplementedError):
            continue
        if not t.is_meta:
            by_shape.setdefault(key, []).append(t)
    counts = {}
    for name, param in params.items():
        same = {t.untyped_storage().data_ptr() for t in by_shape.get((tuple(param.shape), param.dtype), [])
                if torch.equal(t.detach(), param.detach())}
        counts[name] = len(same)
    return counts


def test_student_and_teacher_share_every_frozen_weight_and_output_reloads(tmp_path):
    pipe = tiny_flux_pipeline()
    before = digests(pipe)
    flags = {name: p.requires_grad for name, p in pipe.transformer.named_parameters()}
    full = transformer_output(pipe)
    originals = dict(pipe.transformer.named_parameters())
    trainable_names = {n for n in originals if n.rsplit(".", 1)[0].endswith(("to_q", "to_k", "to_v", "to_out.0"))
                       and ".attn." in n}
    frozen = {n: p for n, p in originals.items() if n not in trainable_names}
    copies_before = storage_copies(frozen)
    settings = DistillSettings(2, steps=3, **{**SMALL, "gradient_checkpointing": True})
    with Distiller(pipe, settings, out=tmp_path / "out", prompts=PROMPTS, progress=False) as run:
        run.setup()
        trainable = {p.key for p in run.teacher_student.projections}
        assert trainable == trainable_names and len(trainable) == 2 * (2 * 4 + 2 * 3)

        # gradient checkpointing (diffusers, non-reentrant) gives the gradients of a plain backward
        batch = data_mod.batch_for(run.train_data, 2, 0, 0)
        grads = []
        for checkpointing in (True, False):
            if not checkpointing:
                pipe.transformer.disable_gradient_checkpointing()
            loss, _ = run.loss(batch)
            loss.backward()
            grads.append([p.grad.clone() for p in run.params])
            run.optimizer.zero_grad(set_to_none=True)
        pipe.transformer.enable_gradient_checkpointing()
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))

        run.train()
        # student mode: every frozen parameter is the very same tensor as before, unchanged
        current = dict(pipe.transformer.named_parameters())
        assert current.keys() == originals.keys()
        for name, param in current.items():
            if name in trainable:
                assert param is not originals[name] and param.untyped_storage().data_ptr() != \
                    originals[name].untyped_storage().data_ptr()
            else:
                assert param is originals[name]
        after_training = digests(pipe)
        changed = {k for k in before if before[k] != after_training[k]}
        assert changed == {f"transformer.p.{k}" for k in trainable}  # only the intended parameters moved
        # one storage per frozen parameter in the whole process: no hidden second copy of the model
        # (equal tensors that existed before, e.g. norm weights that are all ones, are counted then too)
        assert storage_copies(frozen) == copies_before
        # teacher mode is exactly the base model
        with run.teacher_student.teacher():
            assert digests(pipe) == before
            assert all(type(a.processor) is FluxAttnProcessor for _, a in clear_adapters.weights.attention_layers(
                pipe.transformer))
            assert torch.equal(transformer_output(pipe), full)
        student = transformer_output(pipe)
        report = run.finish()
    # closed: the pipeline is given back bit for bit, flags and processors included
    assert digests(pipe) == before
    assert {n: p.requires_grad for n, p in pipe.transformer.named_parameters()} == flags
    assert not pipe.transformer.gradient_checkpointing and clear_adapters.get_handle(pipe) is None
    assert torch.equal(transformer_output(pipe), full)
    assert report["steps"] == 3
    # the written adapter is the trained student
    clear_adapters.load(tmp_path / "out", pipe)
    assert torch.allclose(transformer_output(pipe), student, rtol=0, atol=1e-6)
    clear_adapters.unload(pipe)


# ------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("case", [
    dict(optimizer="prodigy", lr=1.0, down_factor=2, grad_accum=2),
    dict(optimizer="adamw", down_factor=1, grad_accum=1, gradient_checkpointing=True),
], ids=["prodigy-down2-accum2", "adamw-checkpointing"])
def test_resume_continues_to_the_identical_state(tmp_path, case):
    pipe = tiny_flux_pipeline()
    before = digests(pipe)
    options = {**SMALL, **case}
    straight = distill(pipe, 2, out=tmp_path / "straight", prompts=PROMPTS, steps=4, progress=False, **options)
    cache = tmp_path / "straight" / "cache"
    first = distill(pipe, 2, out=tmp_path / "split", prompts=PROMPTS, steps=2, cache_dir=cache, progress=False,
                    **options)
    assert first["data"]["from_cache"]  # a second run with the same inputs skips generation
    resumed = distill(pipe, 2, out=tmp_path / "split", prompts=PROMPTS, steps=4, cache_dir=cache,
                      resume=tmp_path / "split", progress=False, **options)
    assert digests(pipe) == before  # three runs, the pipeline given back unchanged each time
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    assert resumed["error_before"] == straight["error_before"]
    assert resumed["loss_history"] == straight["loss_history"]
    a = load_file(str(tmp_path / "straight" / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "split" / "checkpoint" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    if case["down_factor"] > 1:
        assert sum(k.endswith("processor.spatial_weight") for k in a) == 4
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert resumed["error_after"] == pytest.approx(straight["error_after"], rel=1e-6)


def test_resume_refuses_other_settings_or_a_missing_checkpoint(tmp_path):
    pipe = tiny_flux_pipeline()
    distill(pipe, 2, out=tmp_path / "run", prompts=PROMPTS, steps=1, progress=False, **SMALL)
    with pytest.raises(DistillationError, match=r"other settings \(lr 0.003 -> 0.001"):
        distill(pipe, 2, out=tmp_path / "run", prompts=PROMPTS, steps=2, resume=tmp_path / "run", progress=False,
                **{**SMALL, "lr": 1e-3})
    with pytest.raises(DistillationError, match="no distillation checkpoint"):
        distill(pipe, 2, out=tmp_path / "other", prompts=PROMPTS, steps=2, resume=tmp_path / "nothing",
                progress=False, **SMALL)
    assert not (tmp_path / "other").exists()


# ------------------------------------------------------------------------------------------ data
def test_batches_are_a_pure_function_of_seed_and_position():
    data = data_mod.DataSet(["a", "b"], torch.zeros(2, 3, 4), torch.zeros(2, 4), [
        data_mod.Bucket(2, 2, torch.arange(5.0)[:, None, None].expand(5, 4, 1), torch.tensor([0, 1, 0, 1, 0])),
        data_mod.Bucket(2, 3, torch.zeros(3, 6, 1), torch.tensor([1, 0, 1]))])
    one, two = data_mod.batch_for(data, 2, 7, 11), data_mod.batch_for(data, 2, 7, 11)
    assert one.bucket == two.bucket and torch.equal(one.index, two.index) and torch.equal(one.noise, two.noise)
    assert not torch.equal(data_mod.batch_for(data, 2, 8, 11).noise, one.noise)
    per_epoch = data_mod.batches_per_epoch(data, 2)
    assert per_epoch == 3 + 2
    seen = {(b.bucket, int(i)) for b in (data_mod.batch_for(data, 2, 7, p) for p in range(per_epoch))
            for i in b.index}
    assert seen == {(0, i) for i in range(5)} | {(1, i) for i in range(3)}  # an epoch visits every sample


def test_image_folder_data_is_encoded_with_the_vae_and_cached(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        tiny_test_image(48 + 8 * i, seed=i).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a house number {i}")
    pipe = tiny_flux_pipeline()
    report = distill(pipe, 2, out=tmp_path / "out", data_dir=folder, steps=1, progress=False,
                     **{**SMALL, "samples": None, "resolution": [(64, 64), (64, 96)]})
    assert report["data"]["source"] == "images" and report["data"]["images"] == 4  # one of 5 held out
    assert report["eval"]["images"] == 1 and report["eval"]["held_out_inputs"] is True
    again = distill(pipe, 2, out=tmp_path / "out2", data_dir=folder, steps=1, cache_dir=tmp_path / "out" / "cache",
                    progress=False, **{**SMALL, "samples": None, "resolution": [(64, 64), (64, 96)]})
    assert again["data"]["from_cache"] and again["error_before"] == report["error_before"]


@pytest.mark.parametrize("variant", ["schnell", "kontext", "bfloat16"])
def test_flux_variants_distil_and_load(tmp_path, variant):
    from diffusers import FluxKontextPipeline

    if variant == "schnell":
        pipe = tiny_flux_pipeline(guidance_embeds=False)
    elif variant == "kontext":
        pipe = tiny_flux_pipeline(pipeline_class=FluxKontextPipeline)
    else:  # a bf16 model: bf16 autocast, float32 master weights, the adapter saved in the model's dtype
        pipe = tiny_flux_pipeline().to(torch.bfloat16)
    report = distill(pipe, 2, out=tmp_path, prompts=PROMPTS, steps=1, progress=False, **SMALL)
    assert report["resolved"]["guidance"] == (None if variant == "schnell" else 3.5)
    assert report["autocast"] == ("torch.bfloat16" if variant == "bfloat16" else None)
    assert 0 < report["error_before"] and report["error_after"] >= 0
    saved = load_file(str(tmp_path / "clear_adapter.safetensors"))
    assert {t.dtype for t in saved.values()} == {pipe.transformer.dtype}
    clear_adapters.load(tmp_path, pipe)
    clear_adapters.unload(pipe)


@pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")
def test_hub_base_is_recorded_with_its_revision(tmp_path, hub_server):
    from huggingface_hub import HfApi

    from clear_adapters.pipelines import load_pipeline

    tiny_flux_pipeline().save_pretrained(tmp_path / "pipe")
    repo = f"tester/tiny-flux-{uuid.uuid4().hex[:8]}"
    HfApi().create_repo(repo)
    commit = HfApi().upload_folder(repo_id=repo, folder_path=tmp_path / "pipe")
    pipe = load_pipeline(repo)
    distill(pipe, 2, out=tmp_path / "out", prompts=PROMPTS, steps=1, progress=False, **SMALL)
    config = read_config(tmp_path / "out" / "clear_config.json")
    assert config["base_model"] == repo and config["base_revision"] == commit.oid
    assert config["provenance"]["base"] == repo


# ------------------------------------------------------------------------------------------ bad input
def _cli(args, capsys):
    code = main(["distill", *args])
    return code, capsys.readouterr().err


def test_bad_input_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n\n")
    code, err = _cli(["--base", "tiny", "--window", "2", "--prompts", str(empty), "--out", str(out)], capsys)
    assert code == 2 and "holds no prompts" in err
    code, err = _cli(["--base", "tiny", "--window", "30", "--resolution", "64", "64", "--out", str(out)], capsys)
    assert code == 2 and "window 30 does not fit resolution 64x64 px" in err
    code, err = _cli(["--base", "tiny", "--window", "2", "--resolution", "66x64", "--out", str(out)], capsys)
    assert code == 2 and "multiples of 4 px" in err
    code, err = _cli(["--base", "tiny", "--window", "2", "--down", "3", "--out", str(out)], capsys)
    assert code == 2 and "multiples of 12 px" in err
    code, err = _cli(["--base", "tiny", "--window", "2", "--data", str(tmp_path), "--self-generate", "3", "--out",
                      str(out)], capsys)
    assert code == 2 and "with data_dir (images) give neither" in err
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # as if not installed
    code, err = _cli(["--base", "tiny", "--window", "2", "--optimizer", "prodigy", "--out", str(out)], capsys)
    assert code == 2 and "pip install prodigyopt" in err
    assert not out.exists()


def test_non_flux_base_is_refused(tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    code, err = _cli(["--base", str(tmp_path / "ddpm"), "--window", "2", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "no FLUX transformer" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(IncompatibleModelError, match="whole FLUX pipeline"):
        distill(tiny_flux_pipeline().transformer, 2, out=tmp_path / "out", progress=False)


def test_output_holding_another_adapter_is_refused_unless_overwrite(tmp_path):
    pipe = tiny_flux_pipeline()
    handle = clear_adapters.attach(3, pipe)
    existing = clear_adapters.save_adapter(handle, tmp_path / "adapter")
    clear_adapters.unload(pipe)
    saved = {p.name: p.read_bytes() for p in existing.iterdir()}
    before = digests(pipe)
    with pytest.raises(DistillationError, match="already holds another adapter"):
        distill(pipe, 2, out=existing, prompts=PROMPTS, steps=1, progress=False, **SMALL)
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == saved and digests(pipe) == before
    report = distill(pipe, 2, out=existing, prompts=PROMPTS, steps=1, overwrite=True, progress=False, **SMALL)
    assert read_config(existing / "clear_config.json")["window_size"] == 2 and report["steps"] == 1


def test_settings_are_validated():
    with pytest.raises(DistillationError, match="loss_weights"):
        DistillSettings(2, loss_weights=(0, 0, 0))
    with pytest.raises(DistillationError, match="steps must be an integer"):
        DistillSettings(2, steps=0)
    with pytest.raises(DistillationError, match="window_size"):
        DistillSettings(0)
    with pytest.raises(DistillationError, match="optimizer"):
        DistillSettings(2, optimizer="sgd")
    assert DistillSettings(2, resolution=512).resolution == ((512, 512),)
    assert DistillSettings(2, resolution=[(512, 768), 256]).resolution == ((512, 768), (256, 256))
    with pytest.raises(TypeError, match="unknown arguments: stepz"):
        distill(None, 2, out="x", stepz=3)
    with pytest.raises(ClearAdapterError):
        DistillSettings(2, resolution=[(0, 64)])


def test_gpu_example_small_mode_runs_on_cpu(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "distill_flux.py"
    spec = importlib.util.spec_from_file_location("distill_flux", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--small", "--device", "cpu", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["resolution"] for r in results["runs"]] == [64, 96]
    assert all(r["seconds_per_step"] > 0 and r["peak_memory_gib"] > 0 for r in results["runs"])
    assert "s/step" in capsys.readouterr().out
    for size in (64, 96):
        check_adapter_dir(tmp_path / f"{size}x{size}")
