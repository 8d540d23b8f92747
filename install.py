"""Run by the webui at launch (unless --skip-install). The toolbox needs only what the webui
already ships (torch, safetensors, gradio); this checks versions and installs nothing."""
from __future__ import annotations

import importlib.metadata as md

NEEDS = {"torch": (2, 0), "safetensors": (0, 3), "gradio": (3, 41)}


def _version(name: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in md.version(name).split("+")[0].split(".")[:2])
    except (md.PackageNotFoundError, ValueError):
        return None


for package, minimum in NEEDS.items():
    found = _version(package)
    if found is None or found < minimum:
        have = "not installed" if found is None else ".".join(map(str, found))
        print(f"[OrthoLoRA Toolbox] needs {package} >= {'.'.join(map(str, minimum))} ({have}); "
              "update the webui — the toolbox tab may not work until then.")
