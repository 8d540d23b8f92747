"""`extract`: base + tuned checkpoint → kohya LoRA (LoCon convs included unless --no-conv)."""
from __future__ import annotations

from ..extract import SVD_METHODS, extract_lora
from ..prediction import PREDICTIONS
from . import DTYPES, common, device_arg, dtype_arg


def add(sub) -> None:
    p = sub.add_parser("extract", help="extract a LoRA from a base and a tuned checkpoint",
                       description="Rank policies: N (fixed), fraction=F[,min=N][,max=N], sv_ratio=P, "
                                   "threshold=T, fro=P, cumulative=P (each may add min=/max=).")
    p.add_argument("base", help="base checkpoint (.safetensors, or .ckpt loaded with weights_only)")
    p.add_argument("tuned", help="fine-tuned checkpoint of the same architecture")
    p.add_argument("-o", "--out", required=True, help="output LoRA file (.safetensors)")
    p.add_argument("--rank", default="fraction=0.08,min=8,max=96", help="rank policy for linear / 1×1 layers")
    p.add_argument("--conv-rank", help="rank policy for 3×3 convs (default: --rank)")
    p.add_argument("--no-conv", dest="conv", action="store_false",
                   help="leave resnet and sampler layers out (no LoCon)")
    p.add_argument("--skip", type=float, default=1e-6, help="skip (and report) layers with max|ΔW| ≤ this")
    p.add_argument("--svd", choices=SVD_METHODS, default="auto")
    p.add_argument("--prediction", choices=("auto", *PREDICTIONS), default="auto",
                   help="the tuned model's prediction type, recorded in the metadata (auto: from its metadata, "
                        "a v_pred key, the file name, then SD2's weight statistic)")
    device_arg(p)
    dtype_arg(p)
    common(p)


def run(args):
    return extract_lora(args.base, args.tuned, args.rank, save_path=args.out, conv_rank=args.conv_rank,
                        conv=args.conv, skip=args.skip, device=args.device, svd=args.svd, dtype=DTYPES[args.dtype],
                        overwrite=args.overwrite, prediction=args.prediction,
                        progress=args.progress)
