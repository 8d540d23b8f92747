"""Shared fixtures: tiny synthetic checkpoints (real key names, widths / 16), built once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lib_ortholora.synth import DeltaSpec, write_pair  # noqa: E402

WEBUI_STUB = ROOT / "tests" / "webui_stub"
# Top-level module names the stand-in provides, and the scripts the tests import against it.
_WEBUI_MODULES = {"networks", "network", "network_lora", "lora_patches", "extra_networks_lora", "stub_model",
                  "modules", "ortholora_hook", "ortholora_tab"}


def _webui_modules() -> list[str]:
    return [k for k in sys.modules if k.split(".")[0] in _WEBUI_MODULES]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavy tests (real child processes, big inputs); -m 'not slow' skips them")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep the norm cache (and anything else under XDG_CACHE_HOME) out of the user's home."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    """fp32 base/tuned pairs per architecture, delta = exact rank-8 (no noise) on every target."""
    made = {}

    def get(arch: str, noise: float = 0.0):
        key = (arch, noise)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{arch}_{noise}")
            made[key] = write_pair(arch, folder, dtype=torch.float32, deltas=DeltaSpec(noise=noise))
        return made[key]

    return get


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one thread is faster, and much faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """Demo models (sd15 pair; demo_style, demo_other, demo_joined), built once per session."""
    from lib_ortholora.ui.standalone import demo_models
    return demo_models(tmp_path_factory.getbasetemp() / "ortholora-demo-models")


@pytest.fixture
def stub_path():
    """The webui stand-in (tests/webui_stub, see its README.md) importable for one test: its folder
    on sys.path and no earlier copy of its modules in sys.modules. Afterwards every module it brought
    (and any script imported against it) is removed and whatever was there before is put back."""
    saved = {k: sys.modules.pop(k) for k in _webui_modules()}
    sys.path.insert(0, str(WEBUI_STUB))
    try:
        yield WEBUI_STUB
    finally:
        sys.path.remove(str(WEBUI_STUB))
        for k in _webui_modules():
            del sys.modules[k]
        sys.modules.update(saved)
