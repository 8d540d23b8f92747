"""Test-only: tiny SD1 / SD2 / SDXL-shaped models whose layer names follow the webui's mapping.

Each model exposes its LoRA targets by kohya name: ``weights()`` (the weight tensor a module
changes; for open_clip q/k/v a row view of the attention's ``in_proj_weight``), ``layers()`` (the
torch layer a target lives in), ``inputs()`` and ``run()`` (forward each target layer once, as a
generation would). Open_clip text encoders (SD2, SDXL's second) use ``nn.MultiheadAttention``:
kohya's q/k/v/out_proj modules all land on that one layer.

  SD1   cond_stage_model.wrapped.transformer.text_model.encoder.layers[0].self_attn.q_proj  Linear(7, 7)
          ← lora_te_text_model_encoder_layers_0_self_attn_q_proj
        model.diffusion_model.input_blocks[1][1].proj_in  Linear(6, 5) ← lora_unet_down_blocks_0_attentions_0_proj_in
        model.diffusion_model.input_blocks[1][0].in_layers[2]  Conv2d(3, 4, 3) ← lora_unet_down_blocks_0_resnets_0_conv1
  SD2   cond_stage_model.wrapped.model.transformer.resblocks[0].attn  MultiheadAttention(8, 2 heads)
          ← lora_te_text_model_encoder_layers_0_self_attn_{q,k,v,out}_proj
        ….resblocks[0].mlp.c_fc  Linear(8, 12) ← lora_te_text_model_encoder_layers_0_mlp_fc1
        + the SD1 UNet layers
  SDXL  conditioner.embedders[0].wrapped.transformer.text_model.encoder.layers[0].self_attn.q_proj  Linear(7, 7)
          ← lora_te1_text_model_encoder_layers_0_self_attn_q_proj
        conditioner.embedders[1].wrapped.model.transformer.resblocks[0].attn  MultiheadAttention(8, 2 heads)
          ← lora_te2_text_model_encoder_layers_0_self_attn_{q,k,v,out}_proj
        model.diffusion_model.input_blocks[4][1].proj_in  Linear(6, 5) ← lora_unet_input_blocks_4_1_proj_in
"""
import torch
from torch import nn

TE_LINEAR = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
UNET_LINEAR = "lora_unet_down_blocks_0_attentions_0_proj_in"
UNET_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
EMBED = 8


def _ns(**children):
    m = nn.Module()
    for k, v in children.items():
        m.add_module(k, v)
    return m


def _clip_encoder():
    """transformers' CLIPTextModel layout: transformer.text_model.encoder.layers[0].self_attn.q_proj."""
    layer = _ns(self_attn=_ns(q_proj=nn.Linear(7, 7)))
    return _ns(transformer=_ns(text_model=_ns(encoder=_ns(layers=nn.ModuleList([layer])))))


def _open_clip_encoder():
    """open_clip's layout: model.transformer.resblocks[0].attn (MultiheadAttention) and .mlp.c_fc."""
    block = _ns(attn=nn.MultiheadAttention(EMBED, 2), mlp=_ns(c_fc=nn.Linear(EMBED, 12)))
    return _ns(model=_ns(transformer=_ns(resblocks=nn.ModuleList([block]))))


def _sd1_unet():
    resblock = _ns(in_layers=nn.Sequential(nn.Identity(), nn.Identity(), nn.Conv2d(3, 4, 3, padding=1)))
    transformer = _ns(proj_in=nn.Linear(6, 5))
    input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(3, 3, 1)]), nn.ModuleList([resblock, transformer])])
    return _ns(diffusion_model=_ns(input_blocks=input_blocks))


def _mha_targets(prefix, mha):
    """kohya q/k/v/out_proj of one open_clip attention → (layer, weight getter) (q/k/v: rows of in_proj)."""
    d = mha.embed_dim
    out = {f"{prefix}_{x}_proj": (mha, lambda i=i: mha.in_proj_weight[i * d:(i + 1) * d]) for i, x in enumerate("qkv")}
    out[f"{prefix}_out_proj"] = (mha, lambda: mha.out_proj.weight)
    return out


class _Tiny(nn.Module):
    is_sdxl = False
    is_sd2 = False

    def _randomize(self, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
                p.requires_grad_(False)

    def _targets(self):
        """kohya name → (torch layer, function returning the weight the module changes)."""
        raise NotImplementedError

    def weights(self):
        return {k: get() for k, (_, get) in self._targets().items()}

    def layers(self):
        return {k: layer for k, (layer, _) in self._targets().items()}

    def inputs(self, seed=1):
        """kohya name → an input of its layer (targets sharing a layer share the input)."""
        g = torch.Generator().manual_seed(seed)
        by_layer = {}
        for layer in self.layers().values():
            if id(layer) in by_layer:
                continue
            if isinstance(layer, nn.MultiheadAttention):
                by_layer[id(layer)] = torch.randn(3, 1, layer.embed_dim, generator=g)
            elif isinstance(layer, nn.Conv2d):
                by_layer[id(layer)] = torch.randn(1, layer.in_channels, 5, 5, generator=g)
            else:
                by_layer[id(layer)] = torch.randn(2, layer.in_features, generator=g)
        return {k: by_layer[id(layer)] for k, layer in self.layers().items()}

    def run(self, which=None, seed=1):
        """Forward each (or each named) target's layer once, as a generation would; returns outputs by name."""
        xs, layers, done = self.inputs(seed), self.layers(), {}
        out = {}
        for k in which or layers:
            layer = layers[k]
            if id(layer) not in done:
                x = xs[k]
                done[id(layer)] = layer(x, x, x, need_weights=False)[0] if isinstance(layer, nn.MultiheadAttention) \
                    else layer(x)
            out[k] = done[id(layer)]
        return out


class TinySD(_Tiny):
    def __init__(self, seed=0, encoder=_clip_encoder):
        super().__init__()
        self.cond_stage_model = _ns(wrapped=encoder())
        self.model = _sd1_unet()
        self._randomize(seed)

    def _targets(self):
        d = self.model.diffusion_model
        te = self.cond_stage_model.wrapped.transformer.text_model.encoder.layers[0].self_attn.q_proj
        pairs = {TE_LINEAR: te, UNET_LINEAR: d.input_blocks[1][1].proj_in, UNET_CONV: d.input_blocks[1][0].in_layers[2]}
        return {k: (m, lambda m=m: m.weight) for k, m in pairs.items()}


class TinySD2(TinySD):
    is_sd2 = True

    def __init__(self, seed=0):
        super().__init__(seed, _open_clip_encoder)

    def _targets(self):
        d = self.model.diffusion_model
        block = self.cond_stage_model.wrapped.model.transformer.resblocks[0]
        out = _mha_targets("lora_te_text_model_encoder_layers_0_self_attn", block.attn)
        for k, m in {"lora_te_text_model_encoder_layers_0_mlp_fc1": block.mlp.c_fc,
                     UNET_LINEAR: d.input_blocks[1][1].proj_in, UNET_CONV: d.input_blocks[1][0].in_layers[2]}.items():
            out[k] = (m, lambda m=m: m.weight)
        return out


class TinySDXL(_Tiny):
    is_sdxl = True

    def __init__(self, seed=0):
        super().__init__()
        self.conditioner = _ns(embedders=nn.ModuleList([_ns(wrapped=_clip_encoder()), _ns(wrapped=_open_clip_encoder())]))
        blocks = nn.ModuleList([nn.Identity() for _ in range(4)] + [nn.ModuleList([nn.Identity(), _ns(proj_in=nn.Linear(6, 5))])])
        self.model = _ns(diffusion_model=_ns(input_blocks=blocks))
        self._randomize(seed)

    def _targets(self):
        e0, e1 = (e.wrapped for e in self.conditioner.embedders)
        q = e0.transformer.text_model.encoder.layers[0].self_attn.q_proj
        unet = self.model.diffusion_model.input_blocks[4][1].proj_in
        out = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (q, lambda: q.weight)}
        out.update(_mha_targets("lora_te2_text_model_encoder_layers_0_self_attn", e1.model.transformer.resblocks[0].attn))
        out["lora_unet_input_blocks_4_1_proj_in"] = (unet, lambda: unet.weight)
        return out


MODELS = {"sd1": TinySD, "sd2": TinySD2, "sdxl": TinySDXL}
