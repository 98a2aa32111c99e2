"""A researcher's own FLUX-architecture models: wrappers, ``base=`` in every form, pixels per token,
the delta-mode base reader (local and Hub), and the small API a user touches (handle repr, peft-style
aliases, one argument order, the save_pretrained guard)."""

from __future__ import annotations

import json
import logging
import uuid
import warnings

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import save_file

import clear_adapters
from clear_adapters import ClearPersistenceWarning, IncompatibleModelError, IntegrityError, api
from clear_adapters.base_weights import load_base_tensors
from clear_adapters.testing import tiny_finetuned_transformer, tiny_flux_pipeline, tiny_flux_transformer, \
    write_reference_checkpoint
from clear_adapters.weights import attention_layers

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")]

KEYS = ["transformer_blocks.1.attn.to_k.weight", "single_transformer_blocks.0.attn.to_q.bias"]


class Wrapper(torch.nn.Module):
    """What a researcher writes: their own module around a FLUX transformer, under another name."""

    def __init__(self, transformer):
        super().__init__()
        self.tr = transformer
        self.head = torch.nn.Linear(4, 4)

    def forward(self, **kwargs):
        return self.tr(**kwargs)


def q_weights(model) -> dict[str, torch.Tensor]:
    return {name: attn.to_q.weight.detach().clone() for name, attn in attention_layers(model)}


def run(model, seed: int = 0) -> torch.Tensor:
    """One forward of the bare tiny transformer on an 8x8 token grid (2 px per token: a 16x16 image)."""
    g = torch.Generator().manual_seed(seed)
    h = w = 8
    img_ids = torch.zeros(h * w, 3)
    img_ids[:, 1] = torch.arange(h).repeat_interleave(w)
    img_ids[:, 2] = torch.arange(w).repeat(h)
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, h * w, 16, generator=g),
                     encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                     pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                     img_ids=img_ids, txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5])).sample


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return write_reference_checkpoint(tmp_path_factory.mktemp("custom") / "clear.safetensors",
                                      tiny_flux_transformer(0), 3)


def test_wrapper_module_load_attach_unload_get_handle(adapter):
    wrapper = Wrapper(tiny_flux_transformer(0))
    before, full = q_weights(wrapper.tr), run(wrapper)
    handle = clear_adapters.load(adapter, wrapper)
    assert clear_adapters.get_handle(wrapper) is handle and wrapper.tr._clear_handle is handle
    assert not torch.equal(run(wrapper), full) and handle.kernel_calls > 0
    clear_adapters.unload(wrapper)
    assert all(torch.equal(before[k], v) for k, v in q_weights(wrapper.tr).items())
    assert torch.equal(run(wrapper), full)
    clear_adapters.attach(1000, wrapper)  # a window covering the grid: full attention again
    assert (run(wrapper) - full).abs().max() <= 1e-5
    clear_adapters.unload(wrapper)

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.student, self.teacher = tiny_flux_transformer(0), tiny_flux_transformer(1)

    with pytest.raises(IncompatibleModelError, match=r"holds 2 FLUX models \(\.student, \.teacher\); pass the one"):
        clear_adapters.load(adapter, Two())
    with pytest.raises(IncompatibleModelError, match="holds no FLUX model"):
        clear_adapters.attach(3, torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_attention_flops_needs_pixels_per_token_on_a_bare_model(adapter):
    handle = clear_adapters.load(adapter, tiny_flux_transformer(0))  # 2 px per token in this test's use
    assert handle.pixels_per_token is None
    with pytest.raises(ValueError, match="pass pixels_per_token="):
        handle.attention_flops(64, 64)
    flops = handle.attention_flops(64, 64, text_len=8, pixels_per_token=2)
    assert flops["image_tokens"] == 32 * 32 and flops["tokens"] == 32 * 32 + 8 and flops["fraction"] < 0.1
    clear_adapters.unload(handle._models[0])
    pipe = tiny_flux_pipeline(0)
    handle = clear_adapters.load(adapter, pipe)
    assert handle.pixels_per_token == 4 and handle.attention_flops(64, 64)["image_tokens"] == 16 * 16
    clear_adapters.unload(pipe)


def test_base_as_module_file_and_prefixed_state_dict(adapter, tmp_path):
    base = tiny_flux_transformer(0)
    state = base.state_dict()
    expected = {k: state[k] for k in KEYS}
    file = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    prefixed = Wrapper(tiny_flux_transformer(0)).state_dict()
    assert "tr.transformer_blocks.1.attn.to_k.weight" in prefixed
    for source in (base, Wrapper(base), str(file), file, prefixed):
        tensors = load_base_tensors(source, KEYS)
        assert all(torch.equal(tensors[k], expected[k]) for k in KEYS), type(source)
    two = {**{f"a.{k}": v for k, v in state.items()}, **{f"b.{k}": v for k, v in state.items()}}
    with pytest.raises(IncompatibleModelError, match=r"several prefixes \('a\.', 'b\.'\).*base=wrapper\.a"):
        load_base_tensors(two, KEYS)
    with pytest.raises(IncompatibleModelError, match="has no tensor transformer_blocks.1.attn.to_k.weight"):
        load_base_tensors({"x": torch.zeros(1)}, KEYS)
    with pytest.raises(clear_adapters.ClearAdapterError, match="no such file or directory"):
        load_base_tensors(str(tmp_path / "missing.safetensors"), KEYS)

    # delta mode on a wrapper whose transformer is a fine-tune, with the base given as the base module
    wrapper = Wrapper(tiny_finetuned_transformer(tiny_flux_transformer(0), seed=2))
    for source in (base, Wrapper(base), prefixed, file):
        handle = clear_adapters.load(adapter, wrapper, weight_mode="delta", base=source)
        assert handle.spec.source == str(adapter)
        clear_adapters.unload(wrapper)


def test_local_shard_index_is_validated(tmp_path, adapter):
    folder = tmp_path / "base" / "transformer"
    tiny_flux_transformer(0).save_pretrained(folder, max_shard_size="60KB")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    good = json.loads(index.read_text())
    assert load_base_tensors(str(tmp_path / "base"), KEYS)
    for text, message in (("{not json", "not valid JSON"), ('["a"]', "malformed"),
                          ('{"weight_map": {"x": 3}}', "malformed")):
        index.write_text(text)
        with pytest.raises(IntegrityError, match=message) as info:
            load_base_tensors(str(tmp_path / "base"), KEYS)
        assert str(index) in str(info.value)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"")
    for shard in ("/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors"):
        index.write_text(json.dumps({"weight_map": {k: shard for k in good["weight_map"]}}))
        with pytest.raises(IntegrityError, match="refuses shard"):
            load_base_tensors(str(tmp_path / "base"), KEYS)
    (folder / "link.safetensors").symlink_to(outside)
    index.write_text(json.dumps({"weight_map": {k: "link.safetensors" for k in good["weight_map"]}}))
    with pytest.raises(IntegrityError, match="resolves outside"):
        load_base_tensors(str(tmp_path / "base"), KEYS)


def test_hub_base_reads_ranges_pinned_to_one_commit(tmp_path, hub_server, caplog):
    base = tiny_flux_transformer(0)
    base.save_pretrained(tmp_path / "repo" / "transformer", max_shard_size="60KB")
    repo_id = f"tester/tiny-base-{uuid.uuid4().hex[:8]}"
    hub = HfApi()
    hub.create_repo(repo_id)
    hub.upload_folder(repo_id=repo_id, folder_path=str(tmp_path / "repo"))
    commit = hub.model_info(repo_id).sha
    seen = len(hub_server.header_log)
    with caplog.at_level(logging.INFO, logger="clear_adapters"):
        tensors = load_base_tensors(repo_id, KEYS, revision="main")
    state = base.state_dict()
    assert all(torch.equal(tensors[k], state[k]) for k in KEYS)
    assert "range requests" in caplog.text and commit[:8] in caplog.text
    reads = [(path, h) for method, path, h in hub_server.header_log[seen:] if method == "GET" and "/resolve/" in path]
    shard_reads = [(path, h) for path, h in reads if path.endswith(".safetensors")]
    assert shard_reads and all(f"/resolve/{commit}/" in path and "Range" in h for path, h in shard_reads)
    # the index download and the header reads name the library (HfFileSystem's range reads cannot)
    named = [h for path, h in reads if path.endswith(".json") or h.get("Range") == "bytes=0-100000"]
    assert len(named) > 2 and all(f"clear-adapters/{clear_adapters.__version__}" in h["User-Agent"] for h in named)

    broken = f"tester/tiny-broken-{uuid.uuid4().hex[:8]}"
    hub.create_repo(broken)
    hub.upload_file(path_or_fileobj=b'{"weight_map": {"x": "../../etc/passwd"}}', repo_id=broken,
                    path_in_repo="transformer/diffusion_pytorch_model.safetensors.index.json")
    with pytest.raises(IntegrityError, match=f"{broken}/transformer/diffusion_pytorch_model.safetensors.index.json: "
                                             "refuses shard"):
        load_base_tensors(broken, KEYS)


def test_handle_repr_aliases_and_argument_order(adapter, tmp_path, hub_server):
    pipe = tiny_flux_pipeline(0)
    handle = clear_adapters.load(adapter, pipe)
    assert repr(handle) == f"ClearHandle({str(adapter)!r}, window_size=3, targets=['transformer'])"
    saved = handle.save_pretrained(tmp_path / "saved", base_model="black-forest-labs/FLUX.1-dev")
    assert (saved / "clear_config.json").is_file()
    repo_id = f"tester/clear-alias-{uuid.uuid4().hex[:8]}"
    result = handle.push_to_hub(repo_id, base_model="black-forest-labs/FLUX.1-dev")
    assert result.changed and "clear_config.json" in result.files
    clear_adapters.unload(pipe)
    assert repr(handle).endswith(", unloaded)")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the documented order raises no warning
        clear_adapters.attach(4, pipe)
        clear_adapters.unload(pipe)
        clear_adapters.attach(window_size=4, pipe=pipe)
        clear_adapters.unload(pipe)
    for old in ((pipe, 4), (pipe,)):
        with pytest.warns(DeprecationWarning, match=r"attach\(window_size, pipe\)"):
            handle = clear_adapters.attach(*old, **({} if len(old) == 2 else {"window_size": 4}))
        assert handle.config.window_size == 4
        clear_adapters.unload(pipe)
    with pytest.raises(TypeError, match="needs a window size and a pipeline"):
        clear_adapters.attach(pipe)


def test_save_pretrained_with_clear_installed_warns(adapter, tmp_path):
    pipe = tiny_flux_pipeline(0)
    clear_adapters.load(adapter, pipe)
    with pytest.warns(ClearPersistenceWarning, match="unload"):
        pipe.transformer.save_pretrained(tmp_path / "transformer")
    with pytest.warns(ClearPersistenceWarning):
        pipe.save_pretrained(tmp_path / "pipe")
    copy = __import__("copy").deepcopy(pipe.transformer)  # the guard follows the copy, not the original
    assert copy.save_pretrained.args[0] is copy
    clear_adapters.unload(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.transformer.save_pretrained(tmp_path / "clean")
    assert "save_pretrained" not in vars(pipe.transformer)
