"""Test-only: a tiny SD1-shaped model whose layer names follow the webui's mapping.

  text encoder  cond_stage_model.wrapped.transformer.text_model.encoder.layers[0].self_attn.q_proj  Linear(7, 7)
                → webui name transformer_text_model_encoder_layers_0_self_attn_q_proj
                ← kohya lora_te_text_model_encoder_layers_0_self_attn_q_proj
  UNet linear   model.diffusion_model.input_blocks[1][1].proj_in  Linear(6, 5)
                → diffusion_model_input_blocks_1_1_proj_in ← lora_unet_down_blocks_0_attentions_0_proj_in
  UNet conv     model.diffusion_model.input_blocks[1][0].in_layers[2]  Conv2d(3, 4, 3, padding=1)
                → diffusion_model_input_blocks_1_0_in_layers_2 ← lora_unet_down_blocks_0_resnets_0_conv1
"""
import torch
from torch import nn

TE_LINEAR = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
UNET_LINEAR = "lora_unet_down_blocks_0_attentions_0_proj_in"
UNET_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


def _ns(**children):
    m = nn.Module()
    for k, v in children.items():
        m.add_module(k, v)
    return m


class TinySD(nn.Module):
    is_sdxl = False
    is_sd2 = False

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        attn = _ns(q_proj=nn.Linear(7, 7))
        layer = _ns(self_attn=attn)
        encoder = _ns(layers=nn.ModuleList([layer]))
        clip = _ns(transformer=_ns(text_model=_ns(encoder=encoder)))
        self.cond_stage_model = _ns(wrapped=clip)
        resblock = _ns(in_layers=nn.Sequential(nn.Identity(), nn.Identity(), nn.Conv2d(3, 4, 3, padding=1)))
        transformer = _ns(proj_in=nn.Linear(6, 5))
        input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(3, 3, 1)]), nn.ModuleList([resblock, transformer])])
        self.model = _ns(diffusion_model=_ns(input_blocks=input_blocks))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            for p in self.parameters():
                p.requires_grad_(False)

    def layers(self):
        """kohya name → torch layer."""
        d = self.model.diffusion_model
        return {
            TE_LINEAR: self.cond_stage_model.wrapped.transformer.text_model.encoder.layers[0].self_attn.q_proj,
            UNET_LINEAR: d.input_blocks[1][1].proj_in,
            UNET_CONV: d.input_blocks[1][0].in_layers[2],
        }

    def inputs(self, seed=1):
        g = torch.Generator().manual_seed(seed)
        return {
            TE_LINEAR: torch.randn(2, 7, generator=g),
            UNET_LINEAR: torch.randn(2, 6, generator=g),
            UNET_CONV: torch.randn(1, 3, 5, 5, generator=g),
        }

    def run(self, which=None, seed=1):
        """Forward each (or the named) target layer once, as a generation would; returns outputs."""
        xs = self.inputs(seed)
        layers = self.layers()
        return {k: layers[k](xs[k]) for k in (which or layers)}
