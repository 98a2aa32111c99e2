"""Integrations of CLEAR with the plugins of the FLUX ecosystem (installed as ``clear_adapters.integrations``).

Each module contributes its glue (if any) and the compatibility cases it adds to ``clear-adapters matrix``:

* ``lora``       -- peft LoRAs through ``load_lora_weights`` (either order, fused, two adapters)
* ``controlnet`` -- single, multi and union ControlNets; CLEAR inside the ControlNet or not; Canny images
* ``ip_adapter`` -- ``load_ip_adapter`` in either order; the IP branch stays dense
* ``variants``   -- schnell-like, Kontext, Fill, Img2Img and fine-tuned transformers (replace / delta)
* ``xdit``, ``halo`` -- multi-process inference: CLEAR inside xfuser's Ulysses/ring, and the exact
  band-split halo mode (no matrix cases; docs/MULTI_GPU.md)

Registration: a module here defines ``CASES``, a list of :class:`clear_adapters.compat.Case`;
:func:`clear_adapters.compat.discover_cases` imports every module of this package (names not starting
with ``_``) and collects them. Code outside the package calls :func:`clear_adapters.compat.register_case`.
The core (``api``, ``processors``, ``weights``, ``kernels``) never imports this package; only the
matrix runner (``clear_adapters.compat``) does, when it runs.
"""
