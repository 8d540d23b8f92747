"""`resize`: shrink LoRAs with base-aware score recipes, size targets or kohya's methods."""
from __future__ import annotations

from ..arch import ARCHS, UNET
from ..errors import OrthoLoraError
from ..fileio import open_tensors
from ..resize import resize_files
from . import DTYPES, common, dtype_arg

EPILOG = """recipes (separated by ':'): score=weight items (spn_ckpt, fro_ckpt, subspace need the
checkpoint; spn_lora, fro_lora do not; weights are normalized) plus thr=LOG10 or size=MiB, e.g.
'spn_ckpt=1,thr=-1.2:spn_lora=1,size=32'; or kohya's methods: sv_ratio=P, sv_fro=P, sv_cumulative=P
(optionally ,rank=N as a cap) or rank=N. Outputs: DIR/<lora stem>_<recipe tag>.safetensors."""


def add(sub) -> None:
    p = sub.add_parser("resize", help="resize LoRAs (exact factor SVD, base-aware recipes, batches)",
                       usage="%(prog)s [CKPT] LORA... -o DIR -r RECIPES", epilog=EPILOG)
    p.add_argument("files", nargs="+", metavar="[CKPT] LORA",
                   help="LoRA files, optionally after the base checkpoint (told apart by its UNet keys)")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("-r", "--recipes", required=True, help="recipes separated by ':' (see below)")
    p.add_argument("--ckpt", help="base checkpoint (instead of giving it first)")
    p.add_argument("--arch", choices=ARCHS, help="architecture of LoRAs that do not say")
    p.add_argument("--cache-dir", help="base-norm cache folder (default $XDG_CACHE_HOME/ortholora or "
                                       "~/.cache/ortholora)")
    dtype_arg(p)
    common(p)


def is_checkpoint(path: str) -> bool:
    """True for a full model file (it holds the UNet's conv_in weight, which no LoRA does); an
    unreadable file is left to the batch, which reports it."""
    try:
        with open_tensors(path) as f:
            return UNET + "input_blocks.0.0.weight" in f
    except OrthoLoraError:
        return False


def split_files(files: list[str], ckpt: str | None) -> tuple[str | None, list[str]]:
    """(checkpoint, LoRAs): the first file is the checkpoint when it is one and --ckpt is not given."""
    if ckpt is None and files and is_checkpoint(files[0]):
        ckpt, files = files[0], files[1:]
    if not files:
        raise OrthoLoraError("no LoRA file given (only a checkpoint)")
    return ckpt, files


def run(args):
    ckpt, loras = split_files(args.files, args.ckpt)
    return resize_files(loras, args.out, args.recipes, ckpt, arch=args.arch, dtype=DTYPES[args.dtype],
                        cache_dir=args.cache_dir, overwrite=args.overwrite, progress=args.progress)
