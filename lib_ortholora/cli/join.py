"""`join`: exact rank concatenation of LoRAs; the slices stay recorded for diag toggles."""
from __future__ import annotations

from ..join import join_loras
from . import DTYPES, common, dtype_arg


def add(sub) -> None:
    p = sub.add_parser("join", help="exact join of LoRAs (rank concatenation, toggleable slices)")
    p.add_argument("loras", nargs="+", help="LoRA / LyCORIS files of one architecture")
    p.add_argument("-r", "--ratio", type=float, nargs="+", help="one ratio for all, or one per LoRA (may be "
                   "negative; default 1)")
    p.add_argument("--names", nargs="+", help="slice names (default: the file names without extension)")
    p.add_argument("-o", "--out", required=True, help="output LoRA (.safetensors)")
    dtype_arg(p)
    common(p)


def run(args):
    ratio = args.ratio[0] if args.ratio and len(args.ratio) == 1 else args.ratio
    return join_loras(args.loras, args.out, ratio, names=args.names, dtype=DTYPES[args.dtype],
                      overwrite=args.overwrite, progress=args.progress)
