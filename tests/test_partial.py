"""Ring-style block attention (kernels/partial.py): merged over key blocks it equals the dense reference."""

import pytest
import torch

from clear_adapters.config import ClearConfig
from clear_adapters.geometry import Geometry
from clear_adapters.kernels import clear_attention, merge_partials
from clear_adapters.kernels import partial as partial_module
from clear_adapters.kernels.partial import block_attention, full_attention_lse


def _chunks(geometry: Geometry, ranks: int, split_text: bool) -> list[torch.Tensor]:
    """Token positions per rank as xfuser's wrapper leaves them: [text chunk (or all text), image chunk]."""
    t, n = geometry.text_len, geometry.image_len
    out = []
    for r in range(ranks):
        txt = torch.arange(r * t // ranks, (r + 1) * t // ranks) if split_text else torch.arange(t)
        out.append(torch.cat([txt, t + torch.arange(r * n // ranks, (r + 1) * n // ranks)]))
    return out


CASES = [  # rows, cols, text, window, ranks, text split
    (8, 6, 4, 3, 2, True), (7, 9, 6, 2.5, 3, True), (10, 4, 5, 4, 2, False), (12, 5, 0, 2, 4, True),
    (6, 6, 3, 20, 3, False), (9, 8, 8, 1, 2, True),
]


@pytest.mark.parametrize("rows,cols,text,window,ranks,split", CASES)
def test_blocks_merged_equal_dense(rows, cols, text, window, ranks, split):
    torch.manual_seed(rows * 100 + cols)
    geometry = Geometry.from_grid(rows, cols, text)
    config = ClearConfig(window)
    q, k, v = (torch.randn(2, 2, geometry.total_len, 8) for _ in range(3))
    reference = clear_attention(q, k, v, geometry, config, backend="dense")
    scale = config.softmax_scale(8, geometry.total_len)
    chunks = _chunks(geometry, ranks, split)
    for qpos in chunks:
        outs, lses = [], []
        for source, kpos in enumerate(chunks):
            out, lse = block_attention(q[:, :, qpos], k[:, :, kpos], v[:, :, kpos], geometry, config, qpos, kpos,
                                       scale=scale, count_text_keys=split or source == 0)
            assert torch.isfinite(out).all()
            outs.append(out)
            lses.append(lse)
        merged, _ = merge_partials(outs, lses)
        torch.testing.assert_close(merged, reference[:, :, qpos], atol=2e-6, rtol=1e-5)


def test_far_key_block_is_skipped_not_masked(monkeypatch):
    """Image queries of rows 0-3 and a key block of rows 14-19 (window 3): only the text part is computed."""
    geometry = Geometry.from_grid(20, 5, 4)
    config = ClearConfig(3)
    q, k, v = (torch.randn(1, 2, geometry.total_len, 8) for _ in range(3))
    t = geometry.text_len
    qpos = torch.cat([torch.arange(t), t + torch.arange(0, 20)])  # text + rows 0..3
    kpos = t + torch.arange(70, 100)  # rows 14..19, no text keys

    def computed(*args, **kwargs):
        raise AssertionError("the image part of an out-of-reach block was computed")

    monkeypatch.setattr(partial_module, "masked_attention_lse", computed)
    out, lse = block_attention(q[:, :, qpos], k[:, :, kpos], v[:, :, kpos], geometry, config, qpos, kpos,
                               scale=config.softmax_scale(8, geometry.total_len))
    assert torch.isneginf(lse[:, :, t:]).all() and (out[:, :, t:] == 0).all()  # image queries: nothing here
    assert torch.isfinite(lse[:, :, :t]).all()  # text queries attend every key


def test_near_block_keeps_only_reachable_rows(monkeypatch):
    """A neighbouring block is cut to the rows the window reaches before the masked kernel runs."""
    geometry = Geometry.from_grid(12, 4, 2)
    config = ClearConfig(2)  # reaches 1 row
    q, k, v = (torch.randn(1, 1, geometry.total_len, 4) for _ in range(3))
    t = geometry.text_len
    qpos, kpos = t + torch.arange(0, 16), t + torch.arange(16, 48)  # rows 0-3 vs rows 4-11
    seen = []
    real = partial_module.masked_attention_lse

    def spy(query, key, value, allowed, scale):
        seen.append(key.clone())
        return real(query, key, value, allowed, scale)

    monkeypatch.setattr(partial_module, "masked_attention_lse", spy)
    block_attention(q[:, :, qpos], k[:, :, kpos], v[:, :, kpos], geometry, config, qpos, kpos,
                    scale=config.softmax_scale(4, geometry.total_len))
    assert len(seen) == 1 and torch.equal(seen[0], k[:, :, t + 16:t + 20])  # row 4 only


def test_each_query_tile_gets_only_its_reachable_keys(monkeypatch):
    """A tall band against itself: every tile of queries sees its rows +- the halo, not the whole block."""
    geometry = Geometry.from_grid(40, 8, 3)
    config = ClearConfig(3)  # reaches 2 rows
    q, k, v = (torch.randn(1, 1, geometry.total_len, 4) for _ in range(3))
    idx = torch.arange(geometry.total_len)
    monkeypatch.setattr(partial_module, "QUERY_TILE", 4)  # 4 x 4 query tiles; keys 8 x 8 at most
    seen = []
    real = partial_module.masked_attention_lse

    def spy(query, key, value, allowed, scale):
        seen.append(key.shape[2])
        return real(query, key, value, allowed, scale)

    monkeypatch.setattr(partial_module, "masked_attention_lse", spy)
    out, lse = block_attention(q, k, v, geometry, config, idx, idx, scale=config.softmax_scale(4, geometry.total_len))
    # text + (4 + 2 x 2) rows x (4 + 2) columns (the grid edge clips one side), 6 x 6 in a corner
    assert len(seen) == 20 and max(seen) == 3 + 8 * 6 and min(seen) == 3 + 6 * 6
    torch.testing.assert_close(out, clear_attention(q, k, v, geometry, config, backend="dense"), atol=2e-6, rtol=1e-5)


def test_full_attention_lse_fused_and_chunked_agree():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    scores = (q @ k.transpose(-1, -2)) * 0.3
    reference = torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)
    fused = full_attention_lse(q, k, v, 0.3)
    with torch.enable_grad():  # the math path (what runs with a gradient), in key chunks merged exactly
        chunked = full_attention_lse(q.requires_grad_(), k, v, 0.3, key_chunk=7)
    for out, lse in (fused, chunked):
        torch.testing.assert_close(out.detach(), reference[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lse.detach(), reference[1], atol=1e-6, rtol=1e-5)
    q.requires_grad_(False)
    empty = full_attention_lse(q, k[:, :, :0], v[:, :, :0], 0.3)
    assert torch.isneginf(empty[1]).all() and (empty[0] == 0).all()


def test_masked_attention_lse_fused_matches_math_and_empty_rows():
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    allowed = torch.rand(6, 20) > 0.5
    allowed[2] = False
    fused = partial_module.masked_attention_lse(q, k, v, allowed, 0.4)
    with torch.enable_grad():
        math = partial_module.masked_attention_lse(q.clone().requires_grad_(), k, v, allowed, 0.4)
    for out, lse in (fused, math):
        assert torch.isneginf(lse[:, :, 2]).all() and (out[:, :, 2] == 0).all()
        torch.testing.assert_close(out.detach(), fused[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lse.detach(), fused[1], atol=1e-6, rtol=1e-5)


def test_pooled_keys_are_refused():
    geometry = Geometry.from_grid(4, 4, 2)
    q = torch.randn(1, 1, geometry.total_len, 4)
    idx = torch.arange(geometry.total_len)
    with pytest.raises(ValueError, match="down_factor 1"):
        block_attention(q, q, q, geometry, ClearConfig(2, 2), idx, idx, scale=0.5)
