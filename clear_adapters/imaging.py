"""Image comparison helpers shared by the demo, the benchmark and the compatibility matrix."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def as_tensor(image) -> torch.Tensor:
    """(C, H, W) float in [0, 1] from a PIL image, a (C,H,W)/(1,C,H,W) tensor or an (H,W,C) array."""
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        return t[0] if t.ndim == 4 else t
    import numpy as np

    arr = np.asarray(image, dtype=np.float32)
    if arr.max() > 1.0:
        arr = arr / 255.0
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1] (inf when identical)."""
    mse = float(F.mse_loss(as_tensor(a), as_tensor(b)))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a, b, window: int = 7, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, averaged over channels."""
    x, y = as_tensor(a)[None], as_tensor(b)[None]
    channels = x.shape[1]
    window = min(window, x.shape[-1], x.shape[-2])
    coords = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, groups=channels)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(value.mean())


def to_pil(image):
    from PIL import Image

    t = as_tensor(image).clamp(0, 1)
    arr = (t.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(arr if arr.shape[2] != 1 else arr[..., 0])


def side_by_side(rows: list[list], gap: int = 4, scale: int = 1):
    """One PIL image: each row a list of images placed left to right (resized to the row's height)."""
    from PIL import Image

    pil_rows = [[to_pil(im) for im in row] for row in rows]
    heights = [max(im.height for im in row) * scale for row in pil_rows]
    widths = [sum(im.width * scale for im in row) + gap * (len(row) - 1) for row in pil_rows]
    canvas = Image.new("RGB", (max(widths), sum(heights) + gap * (len(rows) - 1)), "white")
    y = 0
    for row, h in zip(pil_rows, heights):
        x = 0
        for im in row:
            im = im.convert("RGB").resize((im.width * scale, im.height * scale), Image.NEAREST)
            canvas.paste(im, (x, y))
            x += im.width + gap
        y += h + gap
    return canvas


def difference(a, b, gain: float = 4.0) -> torch.Tensor:
    """|a - b| amplified by ``gain``, clipped to [0, 1]: a visible difference image."""
    return ((as_tensor(a) - as_tensor(b)).abs() * gain).clamp(0, 1)
