"""`merge`: add LoRAs (any supported family) into a checkpoint, streamed; output is safetensors."""
from __future__ import annotations

from ..merge import merge_lora
from . import DTYPES, common


def add(sub) -> None:
    p = sub.add_parser("merge", help="merge one or several LoRAs into a checkpoint")
    p.add_argument("base", help="checkpoint (.safetensors, or .ckpt loaded with weights_only)")
    p.add_argument("loras", nargs="+", help="LoRA / LyCORIS files")
    p.add_argument("-m", "--multiplier", type=float, nargs="+", default=[1.0],
                   help="one multiplier for all LoRAs, or one per LoRA (default 1)")
    p.add_argument("-o", "--out", required=True, help="output checkpoint (.safetensors)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype of floating tensors (default: kept)")
    common(p)


def run(args):
    mult = args.multiplier[0] if len(args.multiplier) == 1 else args.multiplier
    return merge_lora(args.base, args.loras, mult, args.out, dtype=DTYPES[args.dtype] if args.dtype else None,
                      overwrite=args.overwrite, progress=args.progress)
