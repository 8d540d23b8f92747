"""Stand-in for extensions-builtin/Lora/extra_networks_lora.py: `<lora:name:te:unet:dyn>` → load_networks."""
import networks
from modules import extra_networks, shared


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("lora")
        self.errors = {}

    def activate(self, p, params_list):
        self.errors.clear()
        names, te_multipliers, unet_multipliers, dyn_dims = [], [], [], []
        for params in params_list:
            assert params.items
            names.append(params.positional[0])
            # a malformed number here raises and the whole batch goes without LoRAs
            te = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            te = float(params.named.get("te", te))
            unet = float(params.positional[2]) if len(params.positional) > 2 else te
            unet = float(params.named.get("unet", unet))
            dyn = int(params.positional[3]) if len(params.positional) > 3 else None
            dyn = int(params.named["dyn"]) if "dyn" in params.named else dyn
            te_multipliers.append(te)
            unet_multipliers.append(unet)
            dyn_dims.append(dyn)
        networks.load_networks(names, te_multipliers, unet_multipliers, dyn_dims)

    def deactivate(self, p):
        if self.errors:
            p.comment("Networks with errors: " + ", ".join(f"{k} ({v})" for k, v in self.errors.items()))
            self.errors.clear()


def register():
    """What the built-in Lora script does before the UI: register `lora` and its alias `lyco`."""
    networks.extra_network_lora = ExtraNetworkLora()
    extra_networks.register_extra_network(networks.extra_network_lora)
    extra_networks.register_extra_network_alias(networks.extra_network_lora, "lyco")
    return networks.extra_network_lora
