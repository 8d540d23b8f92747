"""The dtypes the toolbox names, in one table: the torch dtype, its code in a safetensors header,
and the short name an output dtype is asked for by (library, CLI, tab, JSON API)."""
from __future__ import annotations

import torch

_TABLE: tuple[tuple[torch.dtype, str, str | None], ...] = (
    # torch dtype          safetensors  output name
    (torch.float16,        "F16",       "fp16"),
    (torch.bfloat16,       "BF16",      "bf16"),
    (torch.float32,        "F32",       "fp32"),
    (torch.float64,        "F64",       None),
    (torch.float8_e4m3fn,  "F8_E4M3",   None),
    (torch.float8_e5m2,    "F8_E5M2",   None),
    (torch.int64,          "I64",       None),
    (torch.int32,          "I32",       None),
    (torch.int16,          "I16",       None),
    (torch.int8,           "I8",        None),
    (torch.uint8,          "U8",        None),
    (torch.bool,           "BOOL",      None),
)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {code: dtype for dtype, code, _ in _TABLE}
"""safetensors header code → torch dtype (every dtype the readers accept)."""
SAFETENSORS_CODES: dict[torch.dtype, str] = {dtype: code for dtype, code, _ in _TABLE}
"""torch dtype → safetensors header code (every dtype the writers write)."""
OUTPUT_DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, _, name in _TABLE if name}
"""Short name → torch dtype of the dtypes outputs are written in (fp16, bf16, fp32)."""
OUTPUT_NAMES: tuple[str, ...] = tuple(OUTPUT_DTYPES)


def torch_name(dtype: torch.dtype) -> str:
    """torch's name of a dtype without the module (`float16`)."""
    return str(dtype).removeprefix("torch.")
