"""Stand-in for the two modules.sd_models readers the Lora runtime uses."""
import json

import safetensors.torch
import torch


def read_metadata_from_safetensors(filename):
    """Header metadata; like the webui, a string value starting with '{' is JSON-decoded if it can be."""
    with open(filename, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    res = {}
    for k, v in header.get("__metadata__", {}).items():
        res[k] = v
        if isinstance(v, str) and v[:1] == "{":
            try:
                res[k] = json.loads(v)
            except Exception:
                pass
    return res


def read_state_dict(filename, map_location=None):
    if filename.lower().endswith(".safetensors"):
        return safetensors.torch.load_file(filename, device="cpu")
    return torch.load(filename, map_location="cpu", weights_only=True)
