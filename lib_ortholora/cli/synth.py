"""`synth`: write a synthetic base + tuned checkpoint pair with real SD key names."""
from __future__ import annotations

from ..arch import ARCHS
from ..report import Report, Row
from ..synth import write_pair
from . import DTYPES, common, dtype_arg


def add(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic base/tuned checkpoint pair (real key names)")
    p.add_argument("--arch", choices=ARCHS, default="sd15")
    p.add_argument("--full", action="store_true", help="real widths (GBs; for benchmarks)")
    p.add_argument("--inpaint", action="store_true", help="9-channel inpainting UNet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", required=True, help="output folder")
    dtype_arg(p)
    common(p)


def run(args) -> Report:
    base, tuned = write_pair(args.arch, args.out, full=args.full, seed=args.seed, dtype=DTYPES[args.dtype],
                             inpaint=args.inpaint, overwrite=args.overwrite, progress=args.progress)
    report = Report("synth", outputs=[str(base), str(tuned)])
    report.add(Row(args.arch, note="full size" if args.full else "widths / 16"))
    return report
