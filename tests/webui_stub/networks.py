"""Stand-in for extensions-builtin/Lora/networks.py: loading, the lazy per-layer merge, functional mode.

See README.md for what is kept and what is simplified.
"""
from __future__ import annotations

import logging
import os
import re

import torch

import network
import network_lora
from modules import devices, errors, sd_models, shared

module_types = [
    network_lora.ModuleTypeLora(),
]

_resnet_suffix = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                  "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
re_x_proj = re.compile(r"(.*)_([qkv]_proj)$")


def _open_clip_name(prefix, layer, rest):
    """kohya text-encoder suffix → open_clip's (mlp_fc1 → mlp_c_fc, mlp_fc2 → mlp_c_proj, self_attn → attn)."""
    if "mlp_fc1" in rest:
        return f"{prefix}model_transformer_resblocks_{layer}_{rest.replace('mlp_fc1', 'mlp_c_fc')}"
    if "mlp_fc2" in rest:
        return f"{prefix}model_transformer_resblocks_{layer}_{rest.replace('mlp_fc2', 'mlp_c_proj')}"
    return f"{prefix}model_transformer_resblocks_{layer}_{rest.replace('self_attn', 'attn')}"


def convert_diffusers_name_to_compvis(key, is_sd2):
    """kohya (diffusers-style) layer name → the webui's layer name. Subset: see README.md."""
    m = re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        block, kind, idx, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            rest = _resnet_suffix.get(rest, rest)
        return f"diffusion_model_input_blocks_{1 + 3 * block + idx}_{1 if kind == 'attentions' else 0}_{rest}"
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        if is_sd2:
            return _open_clip_name("", m[1], m[2])
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        return _open_clip_name("1_", m[1], m[2])
    return key


def assign_network_names_to_compvis_modules(sd_model):
    """Every submodule gets `network_layer_name` = its dotted path with '.' → '_'; SDXL's text
    encoders are prefixed with their embedder index (`0_…`, `1_…`)."""
    mapping = {}
    if sd_model.is_sdxl:
        roots = [(f"{i}_", e.wrapped) for i, e in enumerate(sd_model.conditioner.embedders) if hasattr(e, "wrapped")]
    else:
        roots = [("", getattr(sd_model.cond_stage_model, "wrapped", sd_model.cond_stage_model))]
    for prefix, root in roots + [("", sd_model.model)]:
        for name, module in root.named_modules():
            layer_name = prefix + name.replace(".", "_")
            mapping[layer_name] = module
            module.network_layer_name = layer_name
    sd_model.network_layer_mapping = mapping


def load_network(name, network_on_disk):
    net = network.Network(name, network_on_disk)
    net.mtime = os.path.getmtime(network_on_disk.filename)
    sd = sd_models.read_state_dict(network_on_disk.filename)

    if not hasattr(shared.sd_model, "network_layer_mapping"):
        assign_network_names_to_compvis_modules(shared.sd_model)
    mapping = shared.sd_model.network_layer_mapping
    is_sd2 = "model_transformer_resblocks" in mapping

    matched = {}
    unmatched = {}
    for key_network, weight in sd.items():
        layer_key, _, part = key_network.partition(".")
        key = convert_diffusers_name_to_compvis(layer_key, is_sd2)
        sd_module = mapping.get(key)
        if sd_module is None:
            m = re_x_proj.match(key)
            if m:
                sd_module = mapping.get(m.group(1))
        if sd_module is None and "lora_unet" in layer_key:
            key = layer_key.replace("lora_unet", "diffusion_model")
            sd_module = mapping.get(key)
        elif sd_module is None and "lora_te1_text_model" in layer_key:
            key = layer_key.replace("lora_te1_text_model", "0_transformer_text_model")
            sd_module = mapping.get(key)
        if sd_module is None:
            unmatched[key_network] = key
            continue
        if key not in matched:
            matched[key] = network.NetworkWeights(network_key=key_network, sd_key=key, w={}, sd_module=sd_module)
        matched[key].w[part] = weight

    for key, weights in matched.items():
        net_module = None
        for nettype in module_types:
            net_module = nettype.create_module(net, weights)
            if net_module is not None:
                break
        if net_module is None:
            raise AssertionError(f"Could not find a module type that would accept those keys: {', '.join(weights.w)}")
        net.modules[key] = net_module

    if unmatched:
        logging.debug(f"Network {network_on_disk.filename} didn't match keys: {unmatched}")
    return net


def purge_networks_from_memory():
    while len(networks_in_memory) > shared.opts.lora_in_memory_limit and len(networks_in_memory) > 0:
        networks_in_memory.pop(next(iter(networks_in_memory)), None)


def _on_disk(name):
    if name.lower() in forbidden_network_aliases:
        return available_networks.get(name)
    return available_network_aliases.get(name)


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    already_loaded = {net.name: net for net in loaded_networks if net.name in names}
    loaded_networks.clear()

    missing = [n for n in names if _on_disk(n) is None]
    if missing:
        update_available_networks_by_names(missing)
    on_disk = [_on_disk(n) for n in names]
    if any(x is None for x in on_disk):
        list_available_networks()
        on_disk = [_on_disk(n) for n in names]

    failed = []
    for i, (network_on_disk, name) in enumerate(zip(on_disk, names)):
        net = already_loaded.get(name)
        if network_on_disk is not None:
            if net is None:
                net = networks_in_memory.get(name)
            if net is None or os.path.getmtime(network_on_disk.filename) > net.mtime:
                try:
                    net = load_network(name, network_on_disk)
                    networks_in_memory.pop(name, None)
                    networks_in_memory[name] = net
                except Exception as e:
                    errors.display(e, f"loading network {network_on_disk.filename}")
                    continue
            net.mentioned_name = name
            network_on_disk.read_hash()
        if net is None:
            failed.append(name)
            continue
        net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
        net.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
        net.dyn_dim = dyn_dims[i] if dyn_dims else 1.0
        loaded_networks.append(net)

    if failed:
        logging.info(f"Lora not found: {', '.join(failed)}")
    purge_networks_from_memory()


def store_weights_backup(weight):
    return None if weight is None else weight.to(devices.cpu, copy=True)


def restore_weights_backup(obj, field, weight):
    if weight is None:
        setattr(obj, field, None)
        return
    getattr(obj, field).copy_(weight)


def network_restore_weights_from_backup(self):
    weights_backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)
    if weights_backup is None and bias_backup is None:
        return
    mha = isinstance(self, torch.nn.MultiheadAttention)
    if weights_backup is not None:
        if mha:
            restore_weights_backup(self, "in_proj_weight", weights_backup[0])
            restore_weights_backup(self.out_proj, "weight", weights_backup[1])
        else:
            restore_weights_backup(self, "weight", weights_backup)
    restore_weights_backup(self.out_proj if mha else self, "bias", bias_backup)


def _merge_one(self, module):
    """A Linear/Conv2d layer with its own network module: weight += updown (+ bias)."""
    weight, bias = self.weight, self.bias
    updown, ex_bias = module.calc_updown(weight)
    self.weight.copy_((weight.to(dtype=updown.dtype) + updown).to(dtype=self.weight.dtype))
    if ex_bias is not None and hasattr(self, "bias"):
        if self.bias is None:
            self.bias = torch.nn.Parameter(ex_bias).to(self.weight.dtype)
        else:
            self.bias.copy_((bias + ex_bias).to(dtype=self.bias.dtype))


def _merge_mha(self, module_q, module_k, module_v, module_out):
    """open_clip attention: kohya q/k/v modules on the thirds of in_proj_weight, out_proj on out_proj."""
    qw, kw, vw = self.in_proj_weight.chunk(3, 0)
    updown_q, _ = module_q.calc_updown(qw)
    updown_k, _ = module_k.calc_updown(kw)
    updown_v, _ = module_v.calc_updown(vw)
    updown_out, ex_bias = module_out.calc_updown(self.out_proj.weight)
    self.in_proj_weight += torch.vstack([updown_q, updown_k, updown_v])
    self.out_proj.weight += updown_out
    if ex_bias is not None:
        if self.out_proj.bias is None:
            self.out_proj.bias = torch.nn.Parameter(ex_bias)
        else:
            self.out_proj.bias += ex_bias


def _count_error(net, layer_name, e):
    logging.debug(f"Network {net.name} layer {layer_name}: {e}")
    if extra_network_lora is not None:
        extra_network_lora.errors[net.name] = extra_network_lora.errors.get(net.name, 0) + 1


def network_apply_weights(self):
    """Merge the loaded networks into this layer's weight, unless the wanted tuple is already merged."""
    layer_name = getattr(self, "network_layer_name", None)
    if layer_name is None:
        return

    current_names = getattr(self, "network_current_names", ())
    wanted_names = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)
    mha = isinstance(self, torch.nn.MultiheadAttention)

    weights_backup = getattr(self, "network_weights_backup", None)
    if weights_backup is None and wanted_names != ():
        if current_names != ():
            raise RuntimeError(f"{layer_name} - no backup weights found and current weights are not unchanged")
        if mha:
            weights_backup = (store_weights_backup(self.in_proj_weight), store_weights_backup(self.out_proj.weight))
        else:
            weights_backup = store_weights_backup(self.weight)
        self.network_weights_backup = weights_backup

    bias_backup = getattr(self, "network_bias_backup", None)
    if bias_backup is None and wanted_names != ():
        if mha and self.out_proj.bias is not None:
            bias_backup = store_weights_backup(self.out_proj.bias)
        elif getattr(self, "bias", None) is not None:
            bias_backup = store_weights_backup(self.bias)
        else:
            bias_backup = None
        if bias_backup is not None and current_names != ():
            raise RuntimeError("no backup bias found and current bias are not unchanged")
        self.network_bias_backup = bias_backup

    if current_names == wanted_names:
        return  # the stale-weight rule: nothing else is looked at

    network_restore_weights_from_backup(self)
    for net in loaded_networks:
        module = net.modules.get(layer_name)
        if module is not None and hasattr(self, "weight"):
            try:
                with torch.no_grad():
                    _merge_one(self, module)
            except RuntimeError as e:
                _count_error(net, layer_name, e)
            continue
        qkvo = [net.modules.get(f"{layer_name}_{x}_proj") for x in ("q", "k", "v", "out")]
        if mha and all(qkvo):
            try:
                with torch.no_grad():
                    _merge_mha(self, *qkvo)
            except RuntimeError as e:
                _count_error(net, layer_name, e)
            continue
        if module is not None:
            _count_error(net, layer_name, "couldn't find supported operation")
    self.network_current_names = wanted_names


def network_reset_cached_weight(self):
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None


def network_forward(org_module, input, original_forward):
    """Functional mode: original weights, each network's module adds its output."""
    if len(loaded_networks) == 0:
        return original_forward(org_module, input)
    input = devices.cond_cast_unet(input)
    network_restore_weights_from_backup(org_module)
    network_reset_cached_weight(org_module)
    y = original_forward(org_module, input)
    layer_name = getattr(org_module, "network_layer_name", None)
    for net in loaded_networks:
        module = net.modules.get(layer_name)
        if module is not None:
            y = module.forward(input, y)
    return y


def network_Linear_forward(self, input):
    if shared.opts.lora_functional:
        return network_forward(self, input, originals.Linear_forward)
    network_apply_weights(self)
    return originals.Linear_forward(self, input)


def network_Linear_load_state_dict(self, *args, **kwargs):
    network_reset_cached_weight(self)
    return originals.Linear_load_state_dict(self, *args, **kwargs)


def network_Conv2d_forward(self, input):
    if shared.opts.lora_functional:
        return network_forward(self, input, originals.Conv2d_forward)
    network_apply_weights(self)
    return originals.Conv2d_forward(self, input)


def network_Conv2d_load_state_dict(self, *args, **kwargs):
    network_reset_cached_weight(self)
    return originals.Conv2d_load_state_dict(self, *args, **kwargs)


def network_MultiheadAttention_forward(self, *args, **kwargs):
    network_apply_weights(self)  # merged even in functional mode
    return originals.MultiheadAttention_forward(self, *args, **kwargs)


def network_MultiheadAttention_load_state_dict(self, *args, **kwargs):
    network_reset_cached_weight(self)
    return originals.MultiheadAttention_load_state_dict(self, *args, **kwargs)


def process_network_files(names=None):
    for filename in shared.walk_files(shared.cmd_opts.lora_dir, allowed_extensions=[".pt", ".ckpt", ".safetensors"]):
        name = os.path.splitext(os.path.basename(filename))[0]
        if names and name not in names:
            continue
        try:
            entry = network.NetworkOnDisk(name, filename)
        except OSError:
            errors.report(f"Failed to load network {name} from {filename}", exc_info=True)
            continue
        available_networks[name] = entry
        if entry.alias in available_network_aliases:
            forbidden_network_aliases[entry.alias.lower()] = 1
        available_network_aliases[name] = entry
        available_network_aliases[entry.alias] = entry


def update_available_networks_by_names(names):
    process_network_files(names)


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    available_network_hash_lookup.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    process_network_files()


originals = None  # lora_patches.LoraPatches, set by the extension's script (and by the tests)
extra_network_lora = None

available_networks = {}
available_network_aliases = {}
loaded_networks = []
networks_in_memory = {}
available_network_hash_lookup = {}
forbidden_network_aliases = {}

list_available_networks()
