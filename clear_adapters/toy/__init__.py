"""The toy: a trained miniature FLUX shipped in the package, so CLEAR's checks mean something on a laptop.

A genuine diffusers ``FluxPipeline`` (word-level tokenizers, tiny random frozen CLIP and T5 encoders, a
trained one-level ``AutoencoderKL`` and a trained ~2.3 M-parameter ``FluxTransformer2DModel``) that draws
coloured shapes at 32 x 32 px (16 x 16 latent tokens) from captions such as
``"a big red circle in the top left"``, plus plugins trained for it: a fine-tuned variant, a LoRA, a
ControlNet and CLEAR adapters. It stands in for FLUX.1-dev where no GPU and no download is available;
real-scale numbers come from the GPU commands.

* :mod:`.data` -- scenes and captions; :mod:`.detector` -- reads colour, position, count back;
* :mod:`.pipeline` -- loads the shipped weights (``FluxPipeline.from_pretrained``, offline).

The training script that rebuilds every shipped weight is ``examples/toy/train.py``.
"""
