"""Model files the tab may read and write: listings for the dropdowns, and the only ways a name
typed into the UI or sent to the API becomes a path (inputs must be listed files; outputs go
through `fileio.safe_output_path`, so neither can leave the models folders)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import OrthoLoraError
from ..fileio import safe_output_path
from ..paths import CHECKPOINT_SUFFIXES, LORA_SUFFIXES
from .config import UiConfig

OVERWRITE_HINT = "tick “Overwrite existing files” (API: \"overwrite\": true) to replace it"


def _walk(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """{relative posix path: file} of every file with one of `suffixes` below `folder`, sorted.
    Symlinked folders are followed, each real folder once (under the first name met in sorted
    order), so links that loop back end the walk instead of branching forever."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(suffixes):
                continue
            path = Path(root) / name
            found[path.relative_to(folder).as_posix()] = path
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def _same(path: Path) -> str:
    try:
        return str(path.resolve())
    except OSError:
        return str(path)


def _lookup(listing: dict[str, Path], name: str, what: str, folder: Path) -> Path:
    """A listed file by its label, its label without extension, or a unique stem."""
    if not isinstance(name, str) or not name.strip():
        raise OrthoLoraError(f"no {what} chosen")
    key = name.strip().replace("\\", "/")
    if key in listing:
        return listing[key]
    stripped = {k.rsplit(".", 1)[0]: p for k, p in listing.items()}
    if key in stripped:
        return stripped[key]
    stems = [p for p in listing.values() if p.stem == key]
    if len(stems) == 1:
        return stems[0]
    if len(stems) > 1:
        raise OrthoLoraError(f"{what} name {name!r} is ambiguous; use its path relative to {folder}")
    raise OrthoLoraError(f"no {what} named {name!r} in {folder} (refresh the list?)")


class Folders:
    """Listings and path resolution for one `UiConfig`."""

    def __init__(self, cfg: UiConfig):
        self.cfg = cfg

    # --- listings (labels shown in the dropdowns)
    def loras(self) -> dict[str, Path]:
        return _walk(self.cfg.lora_dir, LORA_SUFFIXES)

    def checkpoints(self) -> dict[str, Path]:
        """The host's list (the webui's, with its labels) plus whatever else is in the folders, so
        a checkpoint written a moment ago shows up before the host refreshes its own list."""
        found: dict[str, Path] = {}
        if self.cfg.list_checkpoints is not None:
            try:
                found = {str(k): Path(v) for k, v in (self.cfg.list_checkpoints() or {}).items()}
            except Exception:  # noqa: BLE001 - a host listing that fails falls back to the folders
                found = {}
        known = {_same(p) for p in found.values()}
        for folder in self.cfg.ckpt_dirs:
            for label, path in _walk(folder, CHECKPOINT_SUFFIXES).items():
                if _same(path) not in known and label not in found:
                    found[label] = path
                    known.add(_same(path))
        return found

    def lora_names(self) -> list[str]:
        return list(self.loras())

    def checkpoint_names(self) -> list[str]:
        return list(self.checkpoints())

    # --- inputs
    def lora(self, name: str) -> Path:
        return _lookup(self.loras(), name, "LoRA", self.cfg.lora_dir)

    def lora_list(self, names) -> list[Path]:
        if isinstance(names, str):
            names = [names]
        if not names:
            raise OrthoLoraError("no LoRA chosen")
        return [self.lora(n) for n in names]

    def checkpoint(self, name: str) -> Path:
        where = ", ".join(map(str, self.cfg.ckpt_dirs)) or "the checkpoint folder"
        return _lookup(self.checkpoints(), name, "checkpoint", Path(where))

    def lora_label(self, path: str | os.PathLike) -> str | None:
        """The dropdown label of a file in the LoRA folder (None if it is not there)."""
        try:
            return Path(path).resolve().relative_to(self.cfg.lora_dir.resolve()).as_posix()
        except ValueError:
            return None

    # --- outputs (the core claims them: an existing file is refused there unless overwrite)
    def lora_output(self, name: str) -> Path:
        return self._output(self.cfg.lora_dir, name)

    def checkpoint_output(self, name: str) -> Path:
        return self._output(self.cfg.ckpt_out_dir, name)

    def lora_prefix(self, prefix: str) -> str:
        """A name prefix for several outputs (ortho); the same rules as one output name."""
        return safe_output_path(self.cfg.lora_dir, prefix, suffix="").name

    @staticmethod
    def _output(folder: Path, name: str) -> Path:
        if not isinstance(name, str):
            raise OrthoLoraError("output name must be text")
        path = safe_output_path(folder, name)
        folder.mkdir(parents=True, exist_ok=True)
        return path
