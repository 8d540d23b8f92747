"""`diag`: bake a per-rank or per-slice diag into a new LoRA (zeroed directions leave the file)."""
from __future__ import annotations

from ..diag import bake_diag
from . import DTYPES, common


def add(sub) -> None:
    p = sub.add_parser("diag", help="bake a diag (per-rank or per-slice scaling) into a LoRA",
                       description="SPEC is per rank (1,1,0,0.5 or 1*8,0*4) or per slice of a joined LoRA "
                                   "(disney=1,krk=0; slices not named keep 1).")
    p.add_argument("lora", help="LoRA file (a joined one for per-slice specs)")
    p.add_argument("spec", help="diag spec")
    p.add_argument("-o", "--out", required=True, help="output LoRA (.safetensors)")
    p.add_argument("--keep-zero", action="store_true", help="keep directions scaled by 0 (default: drop them)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the input's)")
    common(p)


def run(args):
    return bake_diag(args.lora, args.spec, args.out, keep_zero=args.keep_zero,
                     dtype=DTYPES[args.dtype] if args.dtype else None, overwrite=args.overwrite,
                     progress=args.progress)
