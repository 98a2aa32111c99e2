"""The CLI starts without torch, diffusers or peft: they are imported inside the commands that need them.

Checked on the set of imported modules (``sys.modules``) in a fresh interpreter, not on wall time.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "diffusers", "peft", "transformers", "huggingface_hub", "safetensors", "numpy", "PIL")

PROBE = """
import json, sys
import clear_adapters, clear_adapters.cli
imported = {"import": [m for m in HEAVY if m in sys.modules]}
from clear_adapters.cli import main
for argv in (["--help"], ["--version"], ["info", "--help"], ["list"], ["list", "--json"], ["info", "flux-dev/r8"]):
    try:
        main(argv)
    except SystemExit:
        pass
    imported[" ".join(argv)] = [m for m in HEAVY if m in sys.modules]
print("RESULT " + json.dumps(imported))
"""


def test_cli_import_and_light_commands_load_no_heavy_module():
    code = f"HEAVY = {HEAVY!r}\n{PROBE}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    imported = json.loads(line[len("RESULT "):])
    assert imported == {key: [] for key in imported}, imported
    assert "flux-dev/r16-down4" in result.stdout and '"filename": "clear_local_8.safetensors"' in result.stdout


def test_public_names_still_resolve_lazily():
    import clear_adapters

    assert callable(clear_adapters.load) and clear_adapters.ClearHandle.__name__ == "ClearHandle"
    assert issubclass(clear_adapters.OfflineError, clear_adapters.ClearAdapterError)
    assert set(clear_adapters.__all__) <= set(dir(clear_adapters))
    try:
        clear_adapters.no_such_name
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("unknown attribute must raise AttributeError")
