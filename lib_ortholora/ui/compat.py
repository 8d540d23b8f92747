"""The few places where gradio 3.41 (A1111) and 4.x (Forge) differ, in one file."""
from __future__ import annotations

import inspect
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import gradio as gr


@lru_cache(maxsize=None)
def major() -> int:
    try:
        return int(str(gr.__version__).split(".")[0])
    except ValueError:
        return 3


@lru_cache(maxsize=None)
def _params(cls) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__init__).parameters)


def component(cls, **kwargs):
    """`cls(**kwargs)` without the keyword arguments this gradio version does not know."""
    known = _params(cls)
    return cls(**{k: v for k, v in kwargs.items() if k in known})


def on_load_js(blocks, code: str) -> None:
    """Run `code` (a JS function expression) once the page has loaded (standalone server only:
    the webui injects javascript/*.js itself)."""
    if major() >= 4:
        blocks.load(None, None, None, js=code)
    else:
        blocks.load(None, None, None, _js=code)


def queue(blocks, workers: int = 4):
    """Enable the queue with a few workers (gradio 3's default of one would serialize every event)."""
    if major() >= 4:
        return blocks.queue(default_concurrency_limit=workers)
    return blocks.queue(concurrency_count=workers)


def temp_dir() -> Path:
    """Where gradio (3.41 and 4.x) writes the files it serves itself: GRADIO_TEMP_DIR or <tmp>/gradio."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")


def made_by_gradio(blocks, requested: str) -> bool:
    """True for a file gradio itself wrote for `blocks` (a plot, a download), named exactly as
    gradio named it, and still a file inside gradio's temp folder (not a link out of it)."""
    made = set().union(*getattr(blocks, "temp_file_sets", []))
    if requested not in made:
        return False
    root, real = os.path.realpath(temp_dir()), os.path.realpath(requested)
    return os.path.commonpath([root, real]) == root and os.path.isfile(real)
