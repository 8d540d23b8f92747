"""`mix`: weighted LoRA + LoRA merge (exact join, then QR-SVD recompression to a rank policy)."""
from __future__ import annotations

from ..mix import mix_loras
from . import DTYPES, common, dtype_arg


def add(sub) -> None:
    p = sub.add_parser("mix", help="weighted merge of LoRAs, recompressed to a rank or rank policy",
                       description="Rank policies: N (fixed), fraction=F[,min=N][,max=N], sv_ratio=P, "
                                   "threshold=T, fro=P, cumulative=P (each may add min=/max=).")
    p.add_argument("loras", nargs="+", help="LoRA / LyCORIS files of one architecture")
    p.add_argument("-r", "--ratio", type=float, nargs="+", help="one ratio for all, or one per LoRA (default 1)")
    p.add_argument("--rank", required=True, help="output rank or rank policy, e.g. 32 or fro=0.99,max=64")
    p.add_argument("-o", "--out", required=True, help="output LoRA (.safetensors)")
    dtype_arg(p)
    common(p)


def run(args):
    ratio = args.ratio[0] if args.ratio and len(args.ratio) == 1 else args.ratio
    return mix_loras(args.loras, args.out, args.rank, ratio, dtype=DTYPES[args.dtype],
                     overwrite=args.overwrite, progress=args.progress)
