"""``push`` / ``clear-adapters push``: card, metadata, idempotence, revisions, refusal rules, secrets.

Runs the real ``huggingface_hub`` client against the local Hub server (tests/hub_server.py, started
by conftest.py); each test pushes to its own repository.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import pytest
import torch

import clear_adapters
from clear_adapters import ClearAdapterError, HubAuthError, IntegrityError
from clear_adapters.artifact import CONFIG_NAME, read_config
from clear_adapters.cli import main
from clear_adapters.geometry import Geometry
from clear_adapters.config import ClearConfig
from clear_adapters.publish import license_for, read_matrix_report, render_card
from clear_adapters.testing import tiny_flux_pipeline, write_reference_checkpoint
from clear_adapters.weights import read_adapter_file

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

BASE = "black-forest-labs/FLUX.1-dev"
WEIGHTS = "clear_adapter.safetensors"


def generate(pipe, steps: int = 2) -> torch.Tensor:
    return pipe("a photo of a cat", height=64, width=64, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


def unique_repo(stem: str) -> str:
    return f"tester/{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """v1: saved from a window-3 reference checkpoint; v2: same adapter, retrained (other weights);
    r4: a different pattern; schnell: same weights, another base model."""
    root = tmp_path_factory.mktemp("push")
    pipe = tiny_flux_pipeline(seed=0)
    checkpoint = write_reference_checkpoint(root / "clear_r3.safetensors", pipe.transformer, window_size=3)
    handle = clear_adapters.load(checkpoint, pipe, window_size=3)
    out = {"v1": clear_adapters.save_adapter(handle, root / "v1", base_model=BASE), "root": root}
    with torch.no_grad():
        pipe.transformer.transformer_blocks[0].attn.to_q.weight.add_(0.01)
    out["v2"] = clear_adapters.save_adapter(handle, root / "v2", base_model=BASE)
    clear_adapters.unload(pipe)
    out["r4"] = clear_adapters.save_adapter(clear_adapters.load(checkpoint, pipe, window_size=4), root / "r4",
                                            base_model=BASE)
    clear_adapters.unload(pipe)
    out["schnell"] = clear_adapters.save_adapter(clear_adapters.load(checkpoint, pipe, window_size=3),
                                                 root / "schnell", base_model="black-forest-labs/FLUX.1-schnell")
    clear_adapters.unload(pipe)
    return out


def test_push_publishes_card_metadata_files_and_loads_identically(adapters, hub_server):
    from huggingface_hub import HfApi

    repo = unique_repo("clear-tiny")
    result = clear_adapters.push(adapters["v1"], repo)
    head = hub_server.commits(repo)[0]
    assert result.changed and result.commit_sha == head
    assert result.commit_url == f"{hub_server.url}/{repo}/commit/{head}"
    info = HfApi().model_info(repo)
    card = info.card_data
    assert card["base_model"] == BASE and card["base_model_relation"] == "adapter"
    assert {"clear", "linear-attention", "flux"} <= set(card["tags"]) and "clear" in info.tags
    assert (card["license"], card["license_name"]) == ("other", "flux-1-dev-non-commercial-license")
    assert card["license_link"].startswith("https://huggingface.co/black-forest-labs/FLUX.1-dev/")
    assert (card["pipeline_tag"], card["library_name"]) == ("text-to-image", "clear-adapters")
    assert {s.rfilename for s in info.siblings} >= {CONFIG_NAME, WEIGHTS, "README.md"}

    local_pipe, hub_pipe = tiny_flux_pipeline(seed=0), tiny_flux_pipeline(seed=0)
    clear_adapters.load(adapters["v1"], local_pipe)
    clear_adapters.load(repo, hub_pipe)
    assert torch.equal(generate(hub_pipe), generate(local_pipe))


def test_pushing_unchanged_creates_no_commit_and_old_revisions_keep_old_weights(adapters, hub_server):
    repo = unique_repo("versions")
    first = clear_adapters.push(adapters["v1"], repo)
    commits = hub_server.commits(repo)
    again = clear_adapters.push(adapters["v1"], repo)
    assert not again.changed and hub_server.commits(repo) == commits and again.commit_sha == first.commit_sha
    second = clear_adapters.push(adapters["v2"], repo)  # same adapter, new weights: no allow_replace needed
    assert second.changed and set(second.files) == {CONFIG_NAME, WEIGHTS, "README.md"}  # the card shows the sha256
    assert hub_server.commits(repo)[1] == first.commit_sha

    key = "transformer_blocks.0.attn.to_q.weight"
    pipe = tiny_flux_pipeline(seed=0)
    for revision, version in ((first.commit_sha, "v1"), (None, "v2")):
        handle = clear_adapters.load(repo, pipe, revision=revision)
        expected, _ = read_adapter_file(adapters[version] / WEIGHTS)
        assert torch.equal(pipe.transformer.state_dict()[key], expected[key]), version
        assert handle.spec.revision == (first.commit_sha if version == "v1" else second.commit_sha)
        clear_adapters.unload(pipe)


def test_push_refuses_to_replace_a_different_adapter(adapters, hub_server):
    repo = unique_repo("replace")
    clear_adapters.push(adapters["v1"], repo)
    commits = hub_server.commits(repo)
    with pytest.raises(ClearAdapterError, match=r"refusing to replace.*window_size 3 -> 4.*allow_replace"):
        clear_adapters.push(adapters["r4"], repo)
    with pytest.raises(ClearAdapterError, match=r"base_model .*FLUX.1-dev.* -> .*FLUX.1-schnell"):
        clear_adapters.push(adapters["schnell"], repo)
    assert hub_server.commits(repo) == commits
    clear_adapters.push(adapters["r4"], repo, revision="r4")  # another branch is fine
    assert clear_adapters.describe(repo, revision="r4")["window_size"] == 4
    assert clear_adapters.describe(repo)["window_size"] == 3

    # allowed explicitly: replaced, and the old weights file does not linger under another name
    renamed = adapters["root"] / "r4-renamed"
    renamed.mkdir()
    config = read_config(adapters["r4"] / CONFIG_NAME)
    (renamed / "clear_r4.safetensors").write_bytes((adapters["r4"] / WEIGHTS).read_bytes())
    (renamed / CONFIG_NAME).write_text(json.dumps({**config, "weights": "clear_r4.safetensors"}))
    result = clear_adapters.push(renamed, repo, allow_replace=True)
    from huggingface_hub import HfApi

    files = set(HfApi().list_repo_files(repo))
    assert result.changed and "clear_r4.safetensors" in files and WEIGHTS not in files

    # a repo holding something else is not silently taken over
    other = unique_repo("occupied")
    HfApi().create_repo(other)
    HfApi().upload_file(path_or_fileobj=b"# my model\n", path_in_repo="README.md", repo_id=other)
    with pytest.raises(ClearAdapterError, match="no CLEAR adapter"):
        clear_adapters.push(adapters["v1"], other)


def test_push_validates_locally_before_any_request(adapters, hub_server, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(adapters["v1"], broken)
    data = bytearray((broken / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (broken / WEIGHTS).write_bytes(bytes(data))
    repo = unique_repo("never-created")
    seen = len(hub_server.request_log)
    with pytest.raises(IntegrityError, match="sha256"):
        clear_adapters.push(broken, repo)
    with pytest.raises(IntegrityError, match=f"no {CONFIG_NAME}"):
        clear_adapters.push(tmp_path, repo)
    with pytest.raises(ValueError, match="owner/name"):
        clear_adapters.push(adapters["v1"], "no-namespace")
    assert not any(repo in path for _, path in hub_server.request_log[seen:])


def test_card_usage_snippet_flop_table_licence_and_matrix(adapters, tmp_path, monkeypatch, hub_server):
    import diffusers
    from huggingface_hub import hf_hub_download

    report_dir = tmp_path / "report"
    report_dir.mkdir()
    # the shape `clear-adapters matrix` writes (clear_adapters/compat.py): identical images' PSNR is null
    cases = [{"name": "lora-fused", "plugin": "lora", "status": "ok", "psnr": 34.5, "ssim": 0.981,
              "exact_at_full_window": True, "passed": True},
             {"name": "ip-adapter", "plugin": "ip_adapter", "status": "ok", "psnr": 12.25, "ssim": 0.5,
              "exact_at_full_window": False, "passed": False},
             {"name": "plain", "plugin": "none", "status": "ok", "psnr": None, "ssim": 1.0,
              "exact_at_full_window": True, "passed": True},
             {"name": "xdit", "plugin": "xdit", "status": "skipped", "reason": "needs 2 GPUs", "passed": None}]
    report = {"pipeline": "tiny", "adapter": "/home/someone/private/adapter", "width": 64, "height": 64,
              "steps": 2, "seed": 0, "device": "cpu", "dtype": "float32", "versions": {"torch": "2.13.0"},
              "summary": {"cases": 4, "passed": 2, "failed": 1, "skipped": 1}, "cases": cases}
    (report_dir / "matrix.json").write_text(json.dumps(report))
    (report_dir / "matrix.md").write_text("# Compatibility matrix\n\n| case | ... |\n")
    repo = unique_repo("card")
    clear_adapters.push(adapters["v1"], repo, matrix=report_dir / "matrix.md", allow_foreign_matrix=True)
    card = Path(hf_hub_download(repo, "README.md")).read_text()
    assert "| lora-fused | lora | 34.50 dB | 0.9810 | yes | ✅ |" in card
    assert "| ip-adapter | ip_adapter | 12.25 dB | 0.5000 | no | ❌ |" in card
    assert "| plain | none | ∞ (identical) | 1.0000 | yes | ✅ |" in card and "| xdit | xdit | — |" in card
    assert "2 of 3 cases passed (1 skipped)" in card and "at 64×64 px on" in card and "torch: 2.13.0" in card
    assert "/home/someone" not in card  # the report's adapter path is not published
    assert read_matrix_report(report_dir)["cases"] == cases
    md_only = tmp_path / "md-only"
    md_only.mkdir()
    (md_only / "matrix.md").write_text("# Matrix\n\n| case | passed |\n|---|---|\n| plain | yes |\n")
    assert "| plain | yes |" in render_card(read_config(adapters["v1"] / CONFIG_NAME), matrix=md_only)
    assert "No compatibility matrix was run" in render_card(read_config(adapters["v1"] / CONFIG_NAME))

    # the FLOP table: Geometry at 1K/2K/4K for FLUX.1-dev shapes, 57 layers
    full = Geometry.from_grid(128, 128, 512).attention_flops(128, 24) * 57
    clear = Geometry.from_grid(128, 128, 512).attention_flops(128, 24, ClearConfig(3)) * 57
    assert f"| 2K (2048×2048) | {128 * 128 + 512} | {full / 1e12:,.1f} | {clear / 1e12:,.1f} |" in card

    assert license_for("black-forest-labs/FLUX.1-schnell") == {"license": "apache-2.0"}
    assert license_for("someone/flux-finetune") == {"license": "other"} == license_for(None)
    assert license_for("black-forest-labs/FLUX.1-Krea-dev")["license_name"] == "flux-1-dev-non-commercial-license"

    # the usage snippet works as written (on a CPU, at test size, with the tiny pipeline standing in)
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert f'clear_adapters.load("{repo}", pipe)' in snippet and f'from_pretrained("{BASE}"' in snippet
    tiny = tiny_flux_pipeline(seed=0)
    monkeypatch.setattr(diffusers.FluxPipeline, "from_pretrained", classmethod(lambda cls, *args, **kwargs: tiny))
    monkeypatch.chdir(tmp_path)
    runnable = snippet.replace('.to("cuda")', "").replace("2048", "64")
    runnable = re.sub(r"num_inference_steps=\d+", "num_inference_steps=2", runnable)
    exec(compile(runnable, "card-snippet", "exec"), {})
    assert (tmp_path / "clear_fox.png").is_file() and getattr(tiny.transformer, "_clear_handle", None) is None


def test_cli_push_then_info(adapters, hub_server, capsys):
    repo = unique_repo("cli")
    assert main(["push", str(adapters["v1"]), repo, "--message", "first adapter"]) == 0
    out = capsys.readouterr().out
    head = hub_server.commits(repo)[0]
    assert f"{hub_server.url}/{repo}/commit/{head}" in out.splitlines()[-1]
    assert main(["push", str(adapters["v1"]), repo]) == 0
    assert "no new commit" in capsys.readouterr().out and hub_server.commits(repo)[0] == head
    assert main(["info", repo]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["window_size"], info["base_model"], info["repo_id"], info["revision"]) == (3, BASE, repo, head)
    assert main(["push", str(adapters["r4"]), repo]) == 2
    assert "allow-replace" in capsys.readouterr().err
    assert main(["push", str(adapters["r4"]), repo, "--revision", "wide", "--private"]) == 0
    assert "@wide" in capsys.readouterr().out


def test_token_never_appears_in_output_errors_cards_or_files(adapters, hub_server, hub_token, capsys, caplog,
                                                              tmp_path):
    import logging

    caplog.set_level(logging.DEBUG)
    repo = unique_repo("secret")
    assert main(["-v", "push", str(adapters["v1"]), repo, "--token", hub_token]) == 0
    pipe = tiny_flux_pipeline(seed=0)
    clear_adapters.load(repo, pipe, token=hub_token)
    clear_adapters.save_adapter(clear_adapters.get_handle(pipe), tmp_path / "resaved")
    wrong = "hf_wrongTOKEN_abcdefgh"
    with pytest.raises(HubAuthError) as refused:
        clear_adapters.push(adapters["v1"], unique_repo("secret-denied"), token=wrong)
    assert main(["push", str(adapters["v1"]), unique_repo("secret-denied"), "--token", wrong]) == 2
    captured = capsys.readouterr()
    for secret in (hub_token, wrong):
        for where, text in (("stdout", captured.out), ("stderr", captured.err), ("logs", caplog.text),
                            ("exception", str(refused.value) + repr(refused.value))):
            assert secret not in text, f"token in {where}"
    # provenance is free text: a token pasted there is refused, not published
    leaky = tmp_path / "leaky"
    clear_adapters.save_adapter(clear_adapters.get_handle(pipe), leaky, provenance=f"trained with {hub_token}")
    with pytest.raises(ClearAdapterError, match="contains a Hub token") as leak:
        clear_adapters.push(leaky, unique_repo("leaky"))
    assert hub_token not in str(leak.value)
    (leaky / CONFIG_NAME).unlink()
    (leaky / "README.md").unlink()
    from huggingface_hub import hf_hub_download

    hf_hub_download(repo, "README.md")  # the published card lands in the cache, which is grepped too
    roots = [Path(os.environ["HF_HOME"]), tmp_path, adapters["root"]]
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                assert hub_token.encode() not in data and wrong.encode() not in data, f"token written to {path}"
