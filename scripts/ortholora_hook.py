"""Runtime hook: diag vectors for joined LoRAs in AUTOMATIC1111's built-in Lora runtime.

Prompt syntax (the named item ``v=`` of a lora/lyco tag; items are separated by ':'):

    <lora:joined:0.8:v=1*4,0*2>          per rank: one value per rank of the joined axis
    <lora:joined:0.8:v=disney@1,krk@0>   per slice: a value per source, unnamed sources keep 1

Write per-slice values with '@' inside a prompt: the built-in runtime treats an item holding two
'=' as a positional multiplier and fails the batch. Where this extension is absent, the built-in
runtime ignores ``v=`` and the joined LoRA works with all ranks on.

How it works (see docs/webui.md#hook):
1. ``ModuleTypeOrthoLora`` goes first in ``networks.module_types``. It claims the lora_up/lora_down
   layers of networks whose file metadata carries ``ortholora_join`` and returns an
   ``OrthoLoraModule``, a ``NetworkModuleLora`` whose ``calc_updown`` (merged mode) and ``forward``
   (functional mode) use up·diag(v) while a vector is set, and behave plainly otherwise.
2. ``OrthoLoraScript.after_extra_networks_activate`` (always on) re-reads each lora/lyco entry's raw
   items, sets (or clears) the vector of every loaded joined network each generation, and when it
   changed marks that network's already-merged layers dirty, so the lazy merge redoes them. The
   applied specs go into the infotext ("OrthoLoRA v"). Any problem: one log line, the LoRA stays plain.

Where the built-in runtime is not the A1111 one (e.g. Forge), the hook stays off (one log line).
The setting ``ortholora_hook_enabled`` (registered by ortholora_tab.py) turns it off too.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys

import torch

try:
    import lib_ortholora  # noqa: F401  (the webui puts the extension folder on sys.path)
except ImportError:  # imported by path from elsewhere
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib_ortholora.diag import (DiagSpec, JoinInfo, apply_diag_to_up, diag_vector, join_info_from_metadata,
                                parse_diag)
from lib_ortholora.errors import OrthoLoraError
from modules import script_callbacks, scripts, shared

log = logging.getLogger("ortholora")

V_KEY = "v"
INFOTEXT_KEY = "OrthoLoRA v"
OPTION = "ortholora_hook_enabled"

# A value of `network_current_names` that equals no real tuple, so the next forward re-merges.
# (Not `()`: a layer marked `()` would keep the merged weights when the next wanted tuple is `()`.)
DIRTY = (("<ortholora: re-merge>", None, None, None),)

try:
    import network
    import network_lora
    import networks

    HOOK_AVAILABLE = (
        isinstance(getattr(networks, "module_types", None), list)
        and isinstance(getattr(networks, "loaded_networks", None), list)
        and hasattr(network, "ModuleType")
        and hasattr(network_lora, "NetworkModuleLora")
    )
    _why_off = "the built-in Lora runtime has no module_types/NetworkModuleLora (not A1111's)"
except Exception as _e:  # noqa: BLE001 - any import failure just turns the hook off
    network = network_lora = networks = None
    HOOK_AVAILABLE = False
    _why_off = f"the built-in Lora extension cannot be imported ({type(_e).__name__}: {_e})"


# --------------------------------------------------------------------------- small, testable parts


def find_v(items) -> str | None:
    """The text after ``v=`` among a tag's raw items (the last one wins), else None.

    Reads the raw items, not ``.named``: other extensions rewrite ``named``, and the webui files an
    item with two '=' (``v=a=1``) as positional, which we still want to see.
    """
    found = None
    for item in list(items or [])[1:]:
        if isinstance(item, str) and "=" in item:
            key, _, value = item.partition("=")
            if key.strip() == V_KEY:
                found = value
    return found


def requested_specs(extra_network_data) -> dict[str, str | None]:
    """Prompt name → raw ``v`` text (None when the tag has none) for the lora and lyco tags."""
    out: dict[str, str | None] = {}
    for kind in ("lora", "lyco"):
        for params in (extra_network_data or {}).get(kind, []) or []:
            items = getattr(params, "items", None)
            if not items or not isinstance(items[0], str):
                continue
            v = find_v(items)
            if v is not None or items[0] not in out:
                out[items[0]] = v
    return out


def join_info_of(net) -> JoinInfo | None:
    """The network's join record, parsed once and kept on the network; None when not joined."""
    cached = net.__dict__.get("ortholora_join_info", False)
    if cached is not False:
        return cached
    info = None
    try:
        info = join_info_from_metadata(getattr(getattr(net, "network_on_disk", None), "metadata", None))
    except OrthoLoraError as e:
        log.warning("OrthoLoRA: %s: %s; treating it as a plain LoRA", getattr(net, "name", "?"), e)
    net.ortholora_join_info = info
    return info


def diag_modules(net) -> dict:
    """kohya module name → module, for the network's modules that take a diag vector."""
    return {m.ortholora_name: m for m in net.modules.values() if hasattr(m, "set_diag")}


def layer_vectors(spec: DiagSpec, info: JoinInfo, ranks: dict[str, int]) -> dict[str, torch.Tensor]:
    """The vector of every module (name → rank as loaded); raises OrthoLoraError on any mismatch."""
    out = {}
    for name, rank in ranks.items():
        v = diag_vector(spec, info, name)
        if v is not None and v.shape[0] != rank:
            raise OrthoLoraError(f"module {name} has rank {rank} in the file but {v.shape[0]} in its join metadata")
        out[name] = v
    return out


def mark_dirty(layer) -> bool:
    """Make the lazy merge redo ``layer`` on its next forward. False when nothing was merged yet."""
    if getattr(layer, "network_weights_backup", None) is None:
        return False  # weights are the originals: the next forward merges from scratch anyway
    layer.network_current_names = DIRTY
    return True


def update_network(net, text: str | None, enabled: bool = True) -> tuple[DiagSpec | None, str | None]:
    """Set this generation's vectors on ``net``; returns (spec applied or None, problem or None).

    Layers are marked dirty only when the applied spec differs from the one already in place, or
    when the network object is new (a reload keeps the same name and multipliers, which alone
    would not trigger a re-merge). Non-joined networks are left alone.
    """
    info = join_info_of(net)
    if info is None:
        if text is not None and enabled:
            return None, "not a joined LoRA (no ortholora_join metadata); v is ignored"
        return None, None
    fresh = not net.__dict__.get("ortholora_seen", False)
    net.ortholora_seen = True
    mods = diag_modules(net)

    spec, problem, vectors = None, None, {}
    if enabled and text is not None:
        try:
            spec = parse_diag(text)
            vectors = layer_vectors(spec, info, {name: m.ortholora_rank for name, m in mods.items()})
        except OrthoLoraError as e:
            spec, problem, vectors = None, str(e), {}

    key = spec.text if spec is not None else None
    if fresh or key != net.__dict__.get("ortholora_key"):
        for name, m in mods.items():
            m.set_diag(vectors.get(name))
        for m in mods.values():
            mark_dirty(m.sd_module)
        net.ortholora_key = key
    return spec, problem


def format_infotext(applied: dict[str, DiagSpec]) -> str:
    return "; ".join(f"{name}: {spec.prompt_text}" for name, spec in applied.items())


def hook_enabled() -> bool:
    try:
        return bool(getattr(shared.opts, OPTION, True))
    except Exception:  # noqa: BLE001
        return True


def _warn_once(p, message: str) -> None:
    """One log line per distinct problem per processing run."""
    try:
        seen = p.__dict__.setdefault("_ortholora_warned", set())
    except Exception:  # noqa: BLE001
        seen = set()
    if message not in seen:
        seen.add(message)
        log.warning("%s", message)


def apply_generation(p, extra_network_data) -> dict[str, DiagSpec]:
    """The hook's work for one activation: vectors on every loaded joined network + infotext."""
    if not HOOK_AVAILABLE:
        return {}
    enabled = hook_enabled()
    requested = requested_specs(extra_network_data) if enabled else {}
    applied: dict[str, DiagSpec] = {}
    for net in list(networks.loaded_networks):
        name = getattr(net, "mentioned_name", None) or getattr(net, "name", "?")
        text = requested.get(name)
        try:
            spec, problem = update_network(net, text, enabled)
        except Exception as e:  # noqa: BLE001 - never into the webui
            spec, problem = None, f"{type(e).__name__}: {e}"
            with contextlib.suppress(Exception):
                for m in diag_modules(net).values():
                    m.set_diag(None)
                    mark_dirty(m.sd_module)
                net.ortholora_key = None
        if problem:
            _warn_once(p, f"OrthoLoRA: <lora:{name}> v={text!r}: {problem}; using the plain LoRA")
        if spec is not None:
            applied[name] = spec

    params = getattr(p, "extra_generation_params", None)
    if isinstance(params, dict):
        if applied:
            params[INFOTEXT_KEY] = format_infotext(applied)
        elif not getattr(p, "is_hr_pass", False):
            params.pop(INFOTEXT_KEY, None)
    return applied


# --------------------------------------------------------------------------- webui adapter

if HOOK_AVAILABLE:

    class OrthoLoraModule(network_lora.NetworkModuleLora):
        """A kohya LoRA layer of a joined file: up is used as up·diag(v) while a vector is set."""

        def __init__(self, net, weights):
            super().__init__(net, weights)
            self.ortholora_name = str(weights.network_key).split(".", 1)[0]
            self.ortholora_v = None
            self._ortholora_up = None

        @property
        def ortholora_rank(self) -> int:
            return int(self.up_model.weight.shape[1])

        def set_diag(self, v: torch.Tensor | None) -> None:
            """Set (or clear with None) the vector; builds the scaled copy of up once."""
            if v is None:
                self.ortholora_v = self._ortholora_up = None
                return
            up = copy.deepcopy(self.up_model)
            with torch.no_grad():
                up.weight.copy_(apply_diag_to_up(up.weight, v))
            self.ortholora_v, self._ortholora_up = v, up

        @contextlib.contextmanager
        def _diag_up(self):
            scaled = self._ortholora_up
            if scaled is None:
                yield
                return
            plain = self.up_model
            self.up_model = scaled
            try:
                yield
            finally:
                self.up_model = plain

        def calc_updown(self, orig_weight):
            with self._diag_up():
                return super().calc_updown(orig_weight)

        def forward(self, x, y):
            with self._diag_up():
                return super().forward(x, y)

    class ModuleTypeOrthoLora(network.ModuleType):
        """Claims the LoRA layers of joined files only; everything else goes to the built-in types."""

        ortholora = True

        def create_module(self, net, weights):
            if join_info_of(net) is None:
                return None
            w = weights.w
            try:
                if "lora_up.weight" not in w and "lora_A.weight" in w and "lora_B.weight" in w:
                    w["lora_up.weight"] = w.pop("lora_B.weight")
                    w["lora_down.weight"] = w.pop("lora_A.weight")
                if "lora_up.weight" in w and "lora_down.weight" in w:
                    return OrthoLoraModule(net, weights)
            except Exception as e:  # noqa: BLE001 - let the built-in types have it
                log.warning("OrthoLoRA: %s layer %s: %s; using the built-in module", net.name, weights.sd_key, e)
            return None

    def install() -> None:
        """Put our module type first (once, also across script reloads)."""
        uninstall()
        networks.module_types.insert(0, ModuleTypeOrthoLora())

    def uninstall() -> None:
        networks.module_types[:] = [t for t in networks.module_types if not getattr(t, "ortholora", False)]

    install()
    script_callbacks.on_script_unloaded(uninstall)
else:
    log.warning("OrthoLoRA: diag-vector hook is off: %s; the rest of the extension works", _why_off)


class OrthoLoraScript(scripts.Script):
    def title(self):
        return "OrthoLoRA diag vectors"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return []

    def after_extra_networks_activate(self, p, *args, **kwargs):
        try:
            apply_generation(p, kwargs.get("extra_network_data"))
        except Exception as e:  # noqa: BLE001 - never raise into the webui
            log.warning("OrthoLoRA: hook failed (%s: %s); LoRAs may be applied without v", type(e).__name__, e)
