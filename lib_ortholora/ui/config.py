"""What the tab needs from its host (the webui adapter or the standalone server): folders,
defaults and callbacks. Nothing of the webui is imported anywhere in `lib_ortholora.ui`."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from ..dtypes import OUTPUT_NAMES as DTYPES

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_RANK_POLICY = "fraction=0.08,min=8,max=96"


@dataclass(frozen=True)
class Defaults:
    """User defaults (the webui's "LoRA Toolbox" settings section)."""

    device: str = "auto"
    dtype: str = "fp16"
    rank_policy: str = DEFAULT_RANK_POLICY

    def checked(self) -> "Defaults":
        """Unknown values fall back to the built-in defaults (settings may hold anything)."""
        return Defaults(self.device if self.device in DEVICES else "auto",
                        self.dtype if self.dtype in DTYPES else "fp16",
                        str(self.rank_policy or "").strip() or DEFAULT_RANK_POLICY)


@dataclass
class UiConfig:
    """The host's side of the tab.

    `lora_dir`: where LoRAs are listed and written. `ckpt_dirs`: where checkpoints are listed (the
    first one receives merged checkpoints). `defaults`: a `Defaults` or a callable returning one
    (read when the tab is built and on each API call, so settings changes apply).
    `list_checkpoints`: optional host listing {label: file path} (the webui's own list), used
    instead of walking `ckpt_dirs` when it returns anything. `on_written(path)`: called after every
    file the tab or the API wrote (the webui refreshes its LoRA list there)."""

    lora_dir: Path
    ckpt_dirs: list[Path]
    defaults: Defaults | Callable[[], Defaults] = field(default_factory=Defaults)
    list_checkpoints: Callable[[], Mapping[str, str | os.PathLike]] | None = None
    on_written: Callable[[Path], None] | None = None
    title: str = "LoRA Toolbox"

    def __post_init__(self) -> None:
        self.lora_dir = Path(self.lora_dir)
        self.ckpt_dirs = [Path(p) for p in self.ckpt_dirs]

    def current_defaults(self) -> Defaults:
        d = self.defaults() if callable(self.defaults) else self.defaults
        return (d or Defaults()).checked()

    @property
    def ckpt_out_dir(self) -> Path:
        return self.ckpt_dirs[0] if self.ckpt_dirs else self.lora_dir.parent / "Stable-diffusion"

    @classmethod
    def for_models(cls, models: str | os.PathLike, **kwargs) -> "UiConfig":
        """The webui layout under one folder: `models/Lora` and `models/Stable-diffusion`."""
        models = Path(models)
        return cls(models / "Lora", [models / "Stable-diffusion"], **kwargs)
