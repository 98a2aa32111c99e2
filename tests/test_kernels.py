"""Property tests: every CLEAR kernel equals the dense masked reference on random geometries."""

import math
import random

import pytest
import torch

from clear_adapters import ClearConfig, Geometry, clear_attention
from clear_adapters.kernels import merge_partials
from clear_adapters.kernels.common import attend


def _random_case(seed: int):
    rng = random.Random(seed)
    d = rng.choice([1, 1, 2, 4])
    h = rng.randint(1, 6) * d if d > 1 else rng.randint(1, 23)
    w = rng.randint(1, 6) * d if d > 1 else rng.randint(1, 23)
    diag = math.hypot(h, w)
    window = rng.choice([1, 1.5, 2, 3, rng.randint(1, 12), diag + 1, diag * 3])
    text = rng.choice([0, 1, rng.randint(0, 77), 77])
    batch = rng.randint(1, 2)
    heads = rng.choice([1, 2, 3])
    dim = rng.choice([8, 16])
    return h, w, window, d, text, batch, heads, dim


CASES = [_random_case(s) for s in range(60)]


def _qkv(batch, heads, n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=g) for _ in range(3)]


def _spatial(d, seed):
    if d == 1:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.full((1, 1, 1, d, 1, d, 1), 1.0 / (d * d)) + 0.05 * torch.randn(1, 1, 1, d, 1, d, 1, generator=g)


def test_case_mix_covers_the_acceptance_space():
    assert len(CASES) >= 50
    assert {c[3] for c in CASES} == {1, 2, 4}
    assert any(c[0] != c[1] for c in CASES) and any(c[0] % 2 for c in CASES) and any(c[0] % 2 == 0 for c in CASES)
    assert any(c[4] == 0 for c in CASES) and any(c[4] == 77 for c in CASES)
    assert any(c[2] > math.hypot(c[0], c[1]) for c in CASES) and any(c[2] == 1 for c in CASES)
    assert {c[5] for c in CASES} == {1, 2}


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("backend", ["tiled", "flex"])
def test_backend_equals_dense(case, backend):
    h, w, window, d, text, batch, heads, dim = CASES[case]
    geometry = Geometry.from_grid(h, w, text)
    config = ClearConfig(window, d)
    q, k, v = _qkv(batch, heads, geometry.total_len, dim, case)
    sw = _spatial(d, case)
    ref = clear_attention(q, k, v, geometry, config, backend="dense", spatial_weight=sw)
    out = clear_attention(q, k, v, geometry, config, backend=backend, spatial_weight=sw)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-5


def test_dense_reference_matches_an_independent_mask():
    """The reference itself: a mask written out pair by pair from CLEAR_REFERENCE.md §1."""
    h, w, t, r, d = 4, 8, 3, 2.5, 2
    geometry = Geometry.from_grid(h, w, t)
    n = t + h * w
    pooled = (h // d) * (w // d)
    mask = torch.zeros(n, n + pooled, dtype=torch.bool)
    for i in range(n):
        for j in range(n + pooled):
            if i < t:
                mask[i, j] = j < n
            elif j < t or j >= n:
                mask[i, j] = True
            else:
                (yi, xi), (yj, xj) = divmod(i - t, w), divmod(j - t, w)
                mask[i, j] = (yi - yj) ** 2 + (xi - xj) ** 2 < r * r
    assert torch.equal(geometry.allowed(ClearConfig(r, d)), mask)
    # strict "<": a key exactly at distance r is outside
    assert not Geometry.from_grid(1, 5).allowed(ClearConfig(2))[0, 2]
    assert Geometry.from_grid(1, 5).allowed(ClearConfig(2))[0, 1]


def test_pooling_uses_post_rope_keys_with_the_learned_weight():
    geometry = Geometry.from_grid(4, 4, 2)
    q, k, v = _qkv(1, 1, geometry.total_len, 4, 0)
    sw = torch.rand(1, 1, 1, 2, 1, 2, 1)
    out = clear_attention(q, k, v, geometry, ClearConfig(1, 2), backend="dense", spatial_weight=sw)
    # manual: image query 0 attends text keys, itself, and the 4 pooled keys
    img = k[0, 0, 2:].view(2, 2, 2, 2, 4)  # (h/d, d, w/d, d, D)
    pooled_k = (img * sw[0, 0, 0, :, 0, :, 0][None, :, None, :, None]).sum((1, 3)).reshape(4, 4)
    vimg = v[0, 0, 2:].view(2, 2, 2, 2, 4)
    pooled_v = (vimg * sw[0, 0, 0, :, 0, :, 0][None, :, None, :, None]).sum((1, 3)).reshape(4, 4)
    keys = torch.cat([k[0, 0, :2], k[0, 0, 2:3], pooled_k])
    values = torch.cat([v[0, 0, :2], v[0, 0, 2:3], pooled_v])
    probs = torch.softmax(q[0, 0, 2] @ keys.T / 2.0, -1)
    assert torch.allclose(out[0, 0, 2], probs @ values, atol=1e-6)


@pytest.mark.parametrize("backend", ["dense", "tiled", "flex"])
def test_log_sum_exp_matches_reference(backend):
    geometry = Geometry.from_grid(5, 7, 4)
    config = ClearConfig(2.5)
    q, k, v = _qkv(2, 2, geometry.total_len, 8, 1)
    mask = geometry.allowed(config)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf"))
    out, lse = clear_attention(q, k, v, geometry, config, backend=backend, return_lse=True)
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-5)
    assert torch.allclose(out, torch.softmax(scores, -1) @ v, atol=1e-5)


def test_partial_sequences_band_against_band_merge_exactly():
    """Sequence-parallel use: query rows of one band against key bands, merged by log-sum-exp."""
    geometry = Geometry.from_grid(8, 6, 5)
    config = ClearConfig(3)
    q, k, v = _qkv(1, 2, geometry.total_len, 8, 2)
    ref = clear_attention(q, k, v, geometry, config, backend="dense")
    t = geometry.text_len
    bands = [torch.arange(t + 0, t + 24), torch.arange(t + 24, t + 48)]
    text = torch.arange(t)
    keys_a = torch.cat([text, bands[0]])
    keys_b = bands[1]
    q_idx = bands[1]  # queries of the second band
    out_a, lse_a = clear_attention(q[:, :, q_idx], k[:, :, keys_a], v[:, :, keys_a], geometry, config,
                                   query_index=q_idx, key_index=keys_a, return_lse=True)
    out_b, lse_b = clear_attention(q[:, :, q_idx], k[:, :, keys_b], v[:, :, keys_b], geometry, config,
                                   query_index=q_idx, key_index=keys_b, return_lse=True)
    merged, _ = merge_partials([out_a, out_b], [lse_a, lse_b])
    assert torch.allclose(merged, ref[:, :, q_idx], atol=1e-5)


@pytest.mark.parametrize("backend", ["dense", "tiled", "flex"])
def test_any_token_order_is_accepted(backend):
    """xDiT's Ulysses order interleaves text and image tokens per rank: [txt0, img0, txt1, img1]."""
    geometry = Geometry.from_grid(6, 4, 6)
    config = ClearConfig(2)
    q, k, v = _qkv(1, 2, geometry.total_len, 8, 3)
    ref = clear_attention(q, k, v, geometry, config, backend="dense")
    t = geometry.text_len
    order = torch.cat([torch.arange(0, 3), torch.arange(t, t + 12), torch.arange(3, 6), torch.arange(t + 12, t + 24)])
    out = clear_attention(q[:, :, order], k[:, :, order], v[:, :, order], geometry, config, backend=backend,
                          query_index=order, key_index=order)
    assert torch.allclose(out, ref[:, :, order], atol=1e-5)


@pytest.mark.parametrize("backend", ["dense", "tiled"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_caller_mask_is_combined_not_replaced(backend, kind):
    """Chroma passes a padding mask: masked text keys stay masked, the window still applies."""
    geometry = Geometry.from_grid(5, 5, 6)
    config = ClearConfig(2)
    n = geometry.total_len
    q, k, v = _qkv(2, 2, n, 8, 4)
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[0, 4:6] = False  # two padded text tokens in the first item
    pad = keep[:, None, None, :] & keep[:, None, :, None] | torch.eye(n, dtype=torch.bool)
    extra = pad if kind == "bool" else torch.zeros(pad.shape).masked_fill(~pad, float("-inf"))
    pattern = geometry.allowed(config)
    expected = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~(pattern & pad), float("-inf")),
                             -1) @ v
    out = clear_attention(q, k, v, geometry, config, backend=backend, attention_mask=extra)
    assert torch.allclose(out, expected, atol=1e-5)


def test_multi_image_sequence_kontext_rule():
    """Two frames on the same coordinates: windows reach across frames at the same (row, col)."""
    geometry = Geometry.from_grid(6, 5, 3, frames=2)
    assert geometry.grids is not None and len(geometry.grids) == 2
    config = ClearConfig(2)
    mask = geometry.allowed(config)
    t, n = 3, 30
    # token (0,0) of frame 0 sees (0,0) and (0,1) of frame 1, not (0,2)
    assert mask[t, t + n] and mask[t, t + n + 1] and not mask[t, t + n + 2]
    q, k, v = _qkv(1, 2, geometry.total_len, 8, 5)
    ref = clear_attention(q, k, v, geometry, config, backend="dense")
    for backend in ("tiled", "flex"):
        out = clear_attention(q, k, v, geometry, config, backend=backend)
        assert (out - ref).abs().max() <= 1e-5


def test_full_window_equals_full_attention():
    geometry = Geometry.from_grid(7, 9, 5)
    q, k, v = _qkv(1, 2, geometry.total_len, 8, 6)
    full = attend(q, k, v, None, 1 / math.sqrt(8))
    for backend in ("dense", "tiled", "flex"):
        out = clear_attention(q, k, v, geometry, ClearConfig(100), backend=backend)
        assert (out - full).abs().max() <= 1e-5


def test_proportional_attention_scale():
    config = ClearConfig(16, proportional_attention=True)
    assert math.isclose(config.softmax_scale(128, 4608), math.sqrt(1 / 128))
    assert math.isclose(config.softmax_scale(128, 4608 * 4), math.sqrt(math.log(4608 * 4, 4608) / 128))
    pooled = ClearConfig(16, 4, proportional_attention=True)
    assert math.isclose(pooled.softmax_scale(128, 1000), math.sqrt(math.log(10_000, 4608) / 128))
    assert ClearConfig(16).softmax_scale(64, 10**6) == 1 / 8


def test_tiled_is_differentiable():
    geometry = Geometry.from_grid(6, 6, 3)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 1, geometry.total_len, 8, 7))
    config = ClearConfig(2, 2)
    sw = torch.full((1, 1, 1, 2, 1, 2, 1), 0.25, requires_grad=True)
    clear_attention(q, k, v, geometry, config, backend="tiled", spatial_weight=sw).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v, sw)]
    for t in (q, k, v, sw):
        t.grad = None
    clear_attention(q, k, v, geometry, config, backend="dense", spatial_weight=sw).square().sum().backward()
    for g, t in zip(grads, (q, k, v, sw)):
        assert torch.allclose(g, t.grad, atol=1e-5)


def test_bad_inputs_are_specific_errors():
    geometry = Geometry.from_grid(4, 4, 2)
    q, k, v = _qkv(1, 1, geometry.total_len, 8, 8)
    with pytest.raises(ValueError, match="tokens but the geometry has"):
        clear_attention(q[:, :, :-1], k, v, geometry, ClearConfig(2))
    with pytest.raises(ValueError, match="not divisible by down_factor 3"):
        clear_attention(q, k, v, geometry, ClearConfig(2, 3))
    with pytest.raises(ValueError, match="window_size"):
        ClearConfig(0)
    with pytest.raises(ValueError, match="backend"):
        ClearConfig(2, backend="cuda-magic")
