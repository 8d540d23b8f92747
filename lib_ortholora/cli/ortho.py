"""`ortho`: shared/secondary directions of K ≥ 2 LoRAs, inputs with the shared part removed, and
their alignment (cosines per layer, per block and over the file) before and after."""
from __future__ import annotations

from ..ortho import ortho_lora
from . import DTYPES, common, dtype_arg


def add(sub) -> None:
    p = sub.add_parser("ortho", help="orthogonalize two or more LoRAs and report how aligned they are",
                       description="Writes into DIR: PREFIX_shared (principal direction), PREFIX_directionP "
                                   "(P = 2..--directions) and STEM_PREFIX_residual per input (input minus "
                                   "λ·shared); λ for every layer and LoRA is in each file's ortholora_ortho "
                                   "metadata. Without -o only the alignment report is computed.")
    p.add_argument("loras", nargs="+", metavar="LORA", help="two or more LoRA files of one architecture")
    p.add_argument("-o", "--out", metavar="DIR", help="output folder (omit for the report only)")
    p.add_argument("--directions", type=int, default=2, help="direction files to write (1 = shared only, "
                                                             "K = all, enough to rebuild every input)")
    p.add_argument("--no-residuals", dest="residuals", action="store_false",
                   help="do not write the inputs minus the shared part")
    p.add_argument("--global-lambda", action="store_true", help="one λ per LoRA for all layers (default: per layer)")
    p.add_argument("--rank", help="rank policy for every output, e.g. 64, fro=0.99,max=128 (default: exact)")
    p.add_argument("--prefix", default="ortho", help="output name prefix")
    dtype_arg(p)
    common(p)


def run(args):
    return ortho_lora(args.loras, args.out, directions=args.directions, residuals=args.residuals,
                      global_lambda=args.global_lambda, rank=args.rank, dtype=DTYPES[args.dtype], prefix=args.prefix,
                      overwrite=args.overwrite, progress=args.progress)
