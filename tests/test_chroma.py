"""Chroma reuses FluxAttention and passes its own padding mask: CLEAR must combine with it."""

import torch

import clear_adapters


def _tiny_chroma():
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(0)
    return ChromaTransformer2DModel(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                    num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
                                    approximator_num_channels=8, approximator_hidden_dim=32,
                                    approximator_layers=1).eval()


def _inputs(h=12, w=10, text=9, batch=2):
    g = torch.Generator().manual_seed(1)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    # the pipeline's mask: 1 for real text tokens and every image token, 0 for padding (float, as Chroma builds it)
    mask = torch.ones(batch, text + h * w)
    mask[0, 5:text] = 0
    return dict(hidden_states=torch.randn(batch, h * w, 16, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
                timestep=torch.tensor([0.5] * batch), img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3),
                attention_mask=mask, return_dict=False)


@torch.no_grad()
def test_chroma_padding_mask_is_combined_with_the_window():
    model = _tiny_chroma()
    inputs = _inputs()
    stock = model(**inputs)[0]
    handle = clear_adapters.attach(1000, model)
    assert (model(**inputs)[0] - stock).abs().max() <= 1e-5
    assert handle.kernel_calls == 4
    clear_adapters.unload(model)
    clear_adapters.attach(2, model)
    small = model(**inputs)[0]
    assert (small - stock).abs().max() > 1e-4
    # the padding still matters under CLEAR: unmasking the padded tokens changes the result
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    assert (model(**inputs)[0][0] - small[0]).abs().max() > 1e-5
