"""Stand-in for extensions-builtin/Lora/network_lora.py: kohya LoRA (lora_up/lora_down[/lora_mid])."""
import torch

import network
from modules import devices


def _rebuild(up, down, shape, dyn_dim=None):
    up = up.reshape(up.size(0), -1)
    down = down.reshape(down.size(0), -1)
    if dyn_dim is not None:  # only the first dyn_dim ranks
        up, down = up[:, :dyn_dim], down[:dyn_dim, :]
    return (up @ down).reshape(shape)


def _rebuild_cp(up, down, mid):
    up = up.reshape(up.size(0), -1)
    down = down.reshape(down.size(0), -1)
    return torch.einsum("n m k l, i n, m j -> i j k l", mid, up, down)


class ModuleTypeLora(network.ModuleType):
    def create_module(self, net, weights):
        if "lora_up.weight" in weights.w and "lora_down.weight" in weights.w:
            return NetworkModuleLora(net, weights)
        if "lora_A.weight" in weights.w and "lora_B.weight" in weights.w:
            w = dict(weights.w)
            weights.w.clear()
            weights.w["lora_up.weight"] = w["lora_B.weight"]
            weights.w["lora_down.weight"] = w["lora_A.weight"]
            return NetworkModuleLora(net, weights)
        return None


class NetworkModuleLora(network.NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.up_model = self.create_module(weights.w, "lora_up.weight")
        self.down_model = self.create_module(weights.w, "lora_down.weight")
        self.mid_model = self.create_module(weights.w, "lora_mid.weight", none_ok=True)
        self.dim = weights.w["lora_down.weight"].shape[0]

    def create_module(self, weights, key, none_ok=False):
        """The factor as a frozen torch layer: Linear for linear targets, Conv2d for conv targets."""
        weight = weights.get(key)
        if weight is None and none_ok:
            return None
        is_linear = type(self.sd_module) in (torch.nn.Linear, torch.nn.modules.linear.NonDynamicallyQuantizableLinear,
                                             torch.nn.MultiheadAttention)
        is_conv = type(self.sd_module) is torch.nn.Conv2d
        if is_linear:
            weight = weight.reshape(weight.shape[0], -1)
            module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        elif is_conv and key == "lora_down.weight":
            if weight.dim() == 2:
                weight = weight.reshape(weight.shape[0], -1, 1, 1)
            if weight.shape[2] != 1 or weight.shape[3] != 1:
                m = self.sd_module
                module = torch.nn.Conv2d(weight.shape[1], weight.shape[0], m.kernel_size, m.stride, m.padding, bias=False)
            else:
                module = torch.nn.Conv2d(weight.shape[1], weight.shape[0], (1, 1), bias=False)
        elif is_conv and key == "lora_mid.weight":
            m = self.sd_module
            module = torch.nn.Conv2d(weight.shape[1], weight.shape[0], m.kernel_size, m.stride, m.padding, bias=False)
        elif is_conv and key == "lora_up.weight":
            module = torch.nn.Conv2d(weight.shape[1], weight.shape[0], (1, 1), bias=False)
        else:
            raise AssertionError(f"Lora layer {self.network_key} matched a layer with unsupported type: "
                                 f"{type(self.sd_module).__name__}")
        with torch.no_grad():
            module.weight.copy_(weight.reshape(module.weight.shape))
        module.to(device=devices.cpu, dtype=devices.dtype)
        module.weight.requires_grad_(False)
        return module

    def calc_updown(self, orig_weight):
        up = self.up_model.weight.to(orig_weight.device)
        down = self.down_model.weight.to(orig_weight.device)
        output_shape = [up.size(0), down.size(1)]
        if self.mid_model is not None:
            mid = self.mid_model.weight.to(orig_weight.device)
            updown = _rebuild_cp(up, down, mid)
            output_shape += mid.shape[2:]
        else:
            if len(down.shape) == 4:
                output_shape += down.shape[2:]
            updown = _rebuild(up, down, output_shape, self.network.dyn_dim)
        return self.finalize_updown(updown, orig_weight, output_shape)

    def forward(self, x, y):
        self.up_model.to(device=devices.device)
        self.down_model.to(device=devices.device)
        return y + self.up_model(self.down_model(x)) * self.multiplier() * self.calc_scale()
