"""Integrations of CLEAR with the plugins of the FLUX ecosystem (installed as ``clear_adapters.integrations``).

Each module contributes its glue (if any) and the compatibility cases it adds to ``clear-adapters matrix``.
The core package never imports these modules.
"""
