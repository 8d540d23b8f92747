"""Runtime hook: diag vectors for joined LoRAs in AUTOMATIC1111's built-in Lora runtime.

Prompt syntax (the named item ``v=`` of a lora/lyco tag; items are separated by ':'):

    <lora:joined:0.8:v=1*4,0*2>          per rank: one value per rank of the joined axis
    <lora:joined:0.8:v=disney=1,krk=0>   per slice: a value per source, unnamed sources keep 1
    <lora:joined:0.8:v=disney@1,krk@0>   the same ('@' is what the webui parses safely)

The built-in runtime files an item holding two '=' as a positional multiplier, float() fails and
the batch loses every LoRA. So before the webui parses a prompt, ``OrthoLoraScript`` rewrites the
'=' inside the ``v=`` item of lora/lyco tags to '@' (``rewrite_prompt``); nothing else changes.
It does so in ``process`` (the first callback after the styles are applied: ``all_prompts``,
``all_hr_prompts``, ``main_prompt``) and again in ``before_process_batch`` (the batch's
``prompts``, for scripts that fill prompts later). Negative prompts are never parsed for networks
and are left alone. Where this extension is absent, the built-in runtime ignores ``v=a@1`` and
the joined LoRA works with all ranks on.

How v is applied (see docs/webui.md#hook):
1. ``ModuleTypeOrthoLora`` goes first in ``networks.module_types``. It claims the lora_up/lora_down
   layers of networks whose file carries ``ortholora_join`` — read from the file's own header when
   the webui loads it, so the slice layout is always that of the bytes being applied — and returns
   an ``OrthoLoraModule``, a ``NetworkModuleLora`` whose ``calc_updown`` (merged mode) and
   ``forward`` (functional mode) see up·diag(v) while a vector is set (``ScaledUp``, computed on use).
2. ``OrthoLoraScript.after_extra_networks_activate`` (always on) re-reads each lora/lyco entry's raw
   items, sets (or clears) the vector of every loaded joined network each generation — one vector
   per slice layout (``SliceIndex``), shared by its modules, nothing copied — and when it changed
   marks that network's already-merged layers dirty, so the lazy merge redoes them. The applied
   specs go into the infotext ("OrthoLoRA v"; "OrthoLoRA hires v" when the hires pass differs).
   Any problem: one log line, the LoRA stays plain.

Where the built-in runtime is not the A1111 one (e.g. Forge), the hook stays off (one log line).
The setting ``ortholora_hook_enabled`` (registered by ortholora_tab.py) turns it off too.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib_ortholora.diag import DiagSpec, apply_diag_to_up, layout_vectors, parse_diag
from lib_ortholora.errors import OrthoLoraError
from lib_ortholora.fileio import SafetensorsFile
from lib_ortholora.joinmeta import JoinInfo, SliceIndex, join_info_from_metadata
from modules import script_callbacks, scripts, shared

log = logging.getLogger("ortholora")

V_KEY = "v"
TAG_KINDS = ("lora", "lyco")
INFOTEXT_KEY = "OrthoLoRA v"
HIRES_INFOTEXT_KEY = "OrthoLoRA hires v"
PROMPT_LISTS = ("all_prompts", "all_hr_prompts", "prompts")
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


_TAG = re.compile(r"<(\w+):([^>]+)>")
"""An extra-network tag, as the webui's extra_networks.parse_prompt finds it."""


def _v_item(item) -> tuple[str, str] | None:
    """(key as written, value) when a tag item is the ``v=`` item, else None."""
    if isinstance(item, str):
        key, eq, value = item.partition("=")
        if eq and key.strip() == V_KEY:
            return key, value
    return None


def _fix_tag(m: re.Match) -> str:
    if m.group(1) not in TAG_KINDS:
        return m.group(0)
    items = m.group(2).split(":")
    for i in range(1, len(items)):
        v = _v_item(items[i])
        if v:
            items[i] = f"{v[0]}={v[1].replace('=', '@')}"
    return f"<{m.group(1)}:{':'.join(items)}>"


def rewrite_prompt(prompt: str) -> str:
    """``prompt`` with every '=' inside the ``v=`` item of lora/lyco tags written '@'
    (``<lora:j:1:v=a=1,b=0>`` → ``<lora:j:1:v=a@1,b@0>``); all else as it was."""
    return _TAG.sub(_fix_tag, prompt) if "<" in prompt else prompt


def fix_prompts(p) -> None:
    """Rewrite (in place) the prompt lists the webui parses for extra networks, and main_prompt."""
    for attr in PROMPT_LISTS:
        prompts = getattr(p, attr, None)
        if isinstance(prompts, list):
            for i, prompt in enumerate(prompts):
                if isinstance(prompt, str):
                    prompts[i] = rewrite_prompt(prompt)
    if isinstance(getattr(p, "main_prompt", None), str):
        p.main_prompt = rewrite_prompt(p.main_prompt)


def find_v(items) -> str | None:
    """The text after ``v=`` among a tag's raw items (the last one wins), else None.

    Reads the raw items, not ``.named``: other extensions rewrite ``named``, and the webui files an
    item with two '=' (``v=a=1``) as positional, which we still want to see.
    """
    found = None
    for item in list(items or [])[1:]:
        v = _v_item(item)
        if v:
            found = v[1]
    return found


def requested_specs(extra_network_data) -> dict[str, list[str | None]]:
    """Prompt name → the raw ``v`` text of each of its lora/lyco tags (None for a tag without one),
    in the order the webui loads them (tag kinds in order of first appearance, then prompt order)."""
    out: dict[str, list[str | None]] = {}
    for kind, entries in (extra_network_data or {}).items():
        if kind not in TAG_KINDS:
            continue
        for params in entries or []:
            items = getattr(params, "items", None)
            if items and isinstance(items[0], str):
                out.setdefault(items[0], []).append(find_v(items))
    return out


def read_join_info(net) -> JoinInfo | None:
    """The join record of the bytes the webui loaded into ``net``, from the file's own header.

    Not ``network_on_disk.metadata``: that is read when the folder is listed and stays as it was
    when the file is rewritten in place, while the weights are reloaded. The header is trusted only
    when the file's mtime still is the one the webui took before reading the weights (``net.mtime``);
    otherwise the file changed during the load and OrthoLoraError says so.
    """
    filename = getattr(getattr(net, "network_on_disk", None), "filename", None)
    if not isinstance(filename, str) or not filename.lower().endswith(".safetensors"):
        return None
    try:
        before = os.stat(filename)
        with SafetensorsFile(Path(filename)) as f:
            metadata = f.metadata
        after = os.stat(filename)
    except OSError as e:
        raise OrthoLoraError(f"cannot read the file's header: {e.strerror or e}") from None
    loaded = getattr(net, "mtime", None)
    if (before.st_ino, before.st_mtime_ns) != (after.st_ino, after.st_mtime_ns) \
            or (loaded is not None and before.st_mtime != loaded):
        raise OrthoLoraError("the file changed on disk while the webui loaded it; v applies once it is "
                             "reloaded (next generation)")
    return join_info_from_metadata(metadata)


def join_info_of(net) -> JoinInfo | None:
    """The network's join record, read once per network object (= per load); None when not joined
    or unreadable (the problem is kept in ``net.ortholora_join_problem``)."""
    cached = net.__dict__.get("ortholora_join_info", False)
    if cached is not False:
        return cached
    info = problem = None
    try:
        info = read_join_info(net)
    except OrthoLoraError as e:
        problem = e.problem
    net.ortholora_join_info, net.ortholora_join_problem = info, problem
    return info


@dataclass
class JoinedState:
    """A loaded joined network's diag modules grouped by slice layout (built once per network)."""

    index: SliceIndex | None
    groups: list[list] = field(default_factory=list)
    """Modules per ``index.groups`` entry (all in one group when ``problem`` is set)."""
    problem: str | None = None
    """Why no vector can be set (metadata and file disagree)."""
    key: str | None = None
    """Canonical text of the spec in place (None: plain)."""


def joined_state(net, info: JoinInfo) -> JoinedState:
    mods = [m for m in net.modules.values() if hasattr(m, "ortholora_v")]
    try:
        index = SliceIndex.of(info, [m.ortholora_name for m in mods])
        for m in mods:
            want = info.total_rank(m.ortholora_name)
            if m.ortholora_rank != want:
                raise OrthoLoraError(f"module {m.ortholora_name} has rank {m.ortholora_rank} in the file but "
                                     f"{want} in its join metadata")
    except OrthoLoraError as e:
        return JoinedState(None, [mods], str(e))
    by_name = {m.ortholora_name: m for m in mods}
    return JoinedState(index, [[by_name[n] for n in names] for _, names in index.groups])


def mark_dirty(layer) -> bool:
    """Make the lazy merge redo ``layer`` on its next forward. False when nothing was merged yet."""
    if getattr(layer, "network_weights_backup", None) is None:
        return False  # weights are the originals: the next forward merges from scratch anyway
    layer.network_current_names = DIRTY
    return True


def update_network(net, text: str | None, enabled: bool = True) -> tuple[DiagSpec | None, str | None]:
    """Set this generation's vectors on ``net``; returns (spec applied or None, problem or None).

    The layers of a network object seen for the first time are marked dirty, joined or not: a
    reload (the file was rewritten) keeps the same name and multipliers, which alone would not
    trigger a re-merge, and the layers may hold the old file's weights and v. After that, a joined
    network's layers are marked only when the applied spec changes.
    """
    info = join_info_of(net)
    if info is None:
        if not net.__dict__.get("ortholora_seen", False):
            net.ortholora_seen = True
            for m in net.modules.values():
                mark_dirty(getattr(m, "sd_module", None))
        if text is not None and enabled:
            return None, net.__dict__.get("ortholora_join_problem") or \
                "not a joined LoRA (no ortholora_join metadata); v is ignored"
        return None, None
    state = net.__dict__.get("ortholora_state")
    fresh = state is None
    if fresh:
        state = net.ortholora_state = joined_state(net, info)

    spec, problem, vectors = None, None, None
    if enabled and text is not None:
        try:
            spec = parse_diag(text)
            if state.problem:
                raise OrthoLoraError(state.problem)
            vectors = layout_vectors(spec, state.index)
        except OrthoLoraError as e:
            spec, problem, vectors = None, str(e), None

    key = spec.text if spec is not None else None
    if fresh or key != state.key:
        for i, mods in enumerate(state.groups):
            v = vectors[i] if vectors else None
            for m in mods:
                m.ortholora_v = v
                mark_dirty(m.sd_module)
        state.key = key
    return spec, problem


def format_infotext(applied: dict[str, DiagSpec]) -> str:
    return "; ".join(f"{name}: {spec.prompt_text}" for name, spec in applied.items())


def record_infotext(p, applied: dict[str, DiagSpec]) -> None:
    """First pass → "OrthoLoRA v"; the hires pass → "OrthoLoRA hires v" when it applied something
    else ("none" when it applied nothing), like the webui's "Hires prompt"."""
    params = getattr(p, "extra_generation_params", None)
    if not isinstance(params, dict):
        return
    text = format_infotext(applied)
    if getattr(p, "is_hr_pass", False):
        if text == params.get(INFOTEXT_KEY, ""):
            params.pop(HIRES_INFOTEXT_KEY, None)
        else:
            params[HIRES_INFOTEXT_KEY] = text or "none"
        return
    params.pop(HIRES_INFOTEXT_KEY, None)
    if text:
        params[INFOTEXT_KEY] = text
    else:
        params.pop(INFOTEXT_KEY, None)


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


def _reset(net) -> None:
    """After an unexpected error: every diag module plain and re-merged."""
    with contextlib.suppress(Exception):
        for m in net.modules.values():
            if hasattr(m, "ortholora_v"):
                m.ortholora_v = None
                mark_dirty(m.sd_module)
        net.ortholora_state = None


def _canonical(text: str | None) -> str | None:
    """A v text in canonical form (as written when it does not parse), to tell different specs apart."""
    try:
        return None if text is None else parse_diag(text).text
    except OrthoLoraError:
        return text


def apply_generation(p, extra_network_data) -> dict[str, DiagSpec]:
    """The hook's work for one activation: vectors on every loaded joined network + infotext."""
    if not HOOK_AVAILABLE:
        return {}
    enabled = hook_enabled()
    requested = requested_specs(extra_network_data) if enabled else {}
    applied: dict[str, DiagSpec] = {}
    done: set[int] = set()
    for net in list(networks.loaded_networks):
        if id(net) in done:  # the webui lists a network once per tag naming it
            continue
        done.add(id(net))
        name = getattr(net, "mentioned_name", None) or getattr(net, "name", "?")
        texts = requested.get(name, [])
        text = texts[-1] if texts else None
        try:
            spec, problem = update_network(net, text, enabled)
        except Exception as e:  # noqa: BLE001 - never into the webui
            spec, problem = None, f"{type(e).__name__}: {e}"
            _reset(net)
        if problem:
            _warn_once(p, f"OrthoLoRA: <lora:{name}> v={text!r}: {problem}; using the plain LoRA")
        if len({_canonical(t) for t in texts}) > 1 and join_info_of(net) is not None:
            shown = ", ".join("none" if t is None else t for t in texts)
            _warn_once(p, f"OrthoLoRA: <lora:{name}> is in the prompt {len(texts)} times with different v ({shown}); "
                          f"the webui applies it {len(texts)} times with the last tag's multipliers, and so the "
                          f"last tag's v ({'none' if text is None else text}) to each")
        if spec is not None:
            applied[name] = spec
    record_infotext(p, applied)
    return applied


# --------------------------------------------------------------------------- webui adapter

class ScaledUp:
    """Stands in for a LoRA module's up layer while a vector v is set: ``weight`` is up·diag(v) and a
    call is up(h·v), both computed on use, so that setting v copies nothing."""

    def __init__(self, up, v: torch.Tensor):
        self.up, self.v = up, v

    @property
    def weight(self) -> torch.Tensor:
        return apply_diag_to_up(self.up.weight, self.v)

    def to(self, *args, **kwargs):
        self.up.to(*args, **kwargs)
        return self

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        v = self.v.to(device=h.device, dtype=h.dtype)
        if isinstance(self.up, torch.nn.Conv2d):  # h: [batch, rank, height, width]
            v = v.reshape(1, -1, *([1] * (h.dim() - 2)))
        return self.up(h * v)


if HOOK_AVAILABLE:

    class OrthoLoraModule(network_lora.NetworkModuleLora):
        """A kohya LoRA layer of a joined file: up is used as up·diag(v) while a vector is set."""

        def __init__(self, net, weights):
            super().__init__(net, weights)
            self.ortholora_name = str(weights.network_key).split(".", 1)[0]
            self.ortholora_v: torch.Tensor | None = None

        @property
        def ortholora_rank(self) -> int:
            return int(self.up_model.weight.shape[1])

        @contextlib.contextmanager
        def _diag_up(self):
            if self.ortholora_v is None:
                yield
                return
            plain = self.up_model
            self.up_model = ScaledUp(plain, self.ortholora_v)
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

    @staticmethod
    def _fix_prompts(p) -> None:
        try:
            fix_prompts(p)
        except Exception as e:  # noqa: BLE001 - never raise into the webui
            log.warning("OrthoLoRA: prompt fix failed (%s: %s); v=name=value may break this batch",
                        type(e).__name__, e)

    def process(self, p, *args):
        self._fix_prompts(p)

    def before_process_batch(self, p, *args, **kwargs):
        self._fix_prompts(p)

    def after_extra_networks_activate(self, p, *args, **kwargs):
        try:
            apply_generation(p, kwargs.get("extra_network_data"))
        except Exception as e:  # noqa: BLE001 - never raise into the webui
            log.warning("OrthoLoRA: hook failed (%s: %s); LoRAs may be applied without v", type(e).__name__, e)
