"""The output policy of every operation, in one place: claim every output before any work, write
each into its own locked temp file, publish them all at the end, or none.

`Outputs.claim` refuses, with one line naming the file, a target that
  - is not a `.safetensors` file (all the toolbox writes; `suffix=None` for other files), is a
    folder, or lies in a folder that does not exist (unless `make_folders`);
  - is the same file as another output of the run (two outputs with one name), or as one of the
    run's inputs (symlinks and hard links included; refused even with `overwrite`);
  - exists, unless `overwrite` (`OutputExists`).
Claiming also removes stale temp files of our naming in the targets' folders (left by a killed
run; listed in `removed`), then creates one temp file per target. Writers write into the temp
(`atomic_output`). `publish` moves every written temp onto its target: first every step that can
fail (fsync; the permissions of the file being replaced), then the moves; a move that still fails
takes back the targets it had created. On any error before that, `discard` removes every temp.

Temp files are `.<target name>.ortholora-<12 hex>.tmp` beside the target. The writer creates one
under a `.new` name, takes an exclusive `flock` on it, and only then renames it to `.tmp`, holding
the lock until it publishes or discards: a `.tmp` of our naming whose lock can be taken has no
live writer and is stale. (Without `fcntl`, on Windows, an open file cannot be deleted, which
gives the same guarantee.)

Runs nest: a target that an enclosing run (or `Outputs` block) has claimed is written into that
claim and published with it.
"""
from __future__ import annotations

import os
import re
import secrets
import stat
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .errors import OrthoLoraError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

PathLike = str | os.PathLike
SAFETENSORS = ".safetensors"
EXISTS = "exists; pass overwrite to replace it"
_TEMP = re.compile(r"\..*\.ortholora-[0-9a-f]{12}\.tmp")
_Key = tuple[int, int, str]


class OutputExists(OrthoLoraError):
    """An output file exists and the run was not asked to overwrite it."""

    def __init__(self, path: PathLike):
        super().__init__(EXISTS, path)


def write_error(err: OSError, target: Path) -> OrthoLoraError:
    """The one-line error for an OS error while writing `target`."""
    return OrthoLoraError(f"cannot write: {err.strerror or err}", target)


def _identity(path: PathLike) -> tuple[int, int] | None:
    """(device, inode) of an existing file (symlinks followed), else None."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _key(path: Path) -> _Key | None:
    """A target's identity that does not depend on how its folder is spelled: (folder, name)."""
    folder = _identity(path.parent)
    return (*folder, os.path.normcase(path.name)) if folder else None


@dataclass
class Claim:
    """One claimed target and the temp file its writer writes (`fd` holds the lock)."""

    target: Path
    tmp: Path
    fd: int
    overwrite: bool
    written: bool = False
    created: bool = False

    def prepare(self) -> None:
        """The steps of publishing that can fail: sync the data, give it the replaced file's mode."""
        os.fsync(self.fd)
        if self.overwrite and os.path.exists(self.target):
            os.chmod(self.tmp, stat.S_IMODE(os.stat(self.target).st_mode))

    def move(self) -> None:
        """The temp becomes the target; without `overwrite` an existing target is never replaced."""
        if self.overwrite:
            self.created = not os.path.lexists(self.target)
            os.replace(self.tmp, self.target)
            return
        try:
            os.link(self.tmp, self.target)
        except FileExistsError:
            raise OutputExists(self.target) from None
        except OSError:  # no hard links on this filesystem
            if os.path.lexists(self.target):
                raise OutputExists(self.target) from None
            os.replace(self.tmp, self.target)
        else:
            os.unlink(self.tmp)
        self.created = True

    def release(self) -> None:
        """Drop the temp file (if still there) and the lock."""
        try:
            self.tmp.unlink(missing_ok=True)
        finally:
            os.close(self.fd)


def _create_temp(target: Path) -> tuple[Path, int]:
    """A new locked temp file beside `target` (see the module docstring)."""
    name = f".{target.name[:150]}.ortholora-{secrets.token_hex(6)}"
    tmp = target.with_name(name + ".tmp")
    first = target.with_name(name + ".new") if fcntl else tmp
    try:
        fd = os.open(first, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise write_error(err, target) from err
    try:
        if fcntl:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(first, tmp)
    except OSError as err:
        os.close(fd)
        os.unlink(first)
        raise write_error(err, target) from err
    return tmp, fd


def _remove_if_stale(path: Path) -> bool:
    """Remove a temp file of our naming whose writer is gone; True if removed."""
    if fcntl is None:
        try:
            path.unlink()  # fails while its writer holds it open
        except OSError:
            return False
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st = os.fstat(fd)
        if _identity(path) != (st.st_dev, st.st_ino):
            return False  # published or removed since we opened it
        path.unlink()
    except OSError:  # locked: a live writer
        return False
    finally:
        os.close(fd)
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the stale temp files of our naming in `folder`; returns them."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [folder / n for n in names if _TEMP.fullmatch(n) and _remove_if_stale(folder / n)]


_ACTIVE: ContextVar[tuple["Outputs", ...]] = ContextVar("ortholora_outputs", default=())


def claimed(path: PathLike) -> Claim | None:
    """The claim of `path` by a run in progress (innermost first), if any."""
    key = _key(Path(path))
    for outputs in reversed(_ACTIVE.get()):
        if key in outputs.claims:
            return outputs.claims[key]
    return None


class Outputs:
    """The files one run writes: claimed before any work, published together when the block ends
    without error, all removed otherwise."""

    def __init__(self) -> None:
        self.claims: dict[_Key, Claim] = {}
        self.removed: list[Path] = []
        self.published: list[Path] = []
        self._made: list[Path] = []
        self._token = None

    def __enter__(self) -> Outputs:
        self._token = _ACTIVE.set(_ACTIVE.get() + (self,))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _ACTIVE.reset(self._token)
        if exc_type is None:
            self.publish()
        else:
            self.discard()

    def claim(self, targets: Iterable[PathLike], *, inputs: Iterable[PathLike | None] = (), overwrite: bool = False,
              suffix: str | None = SAFETENSORS, make_folders: bool = False) -> list[Path]:
        """Claim `targets` (refusals: see the module docstring); returns them as paths, in order."""
        paths = [Path(t) for t in targets]
        sources = {i for i in map(_identity, (p for p in inputs if p is not None)) if i is not None}
        enclosing = {k for outputs in _ACTIVE.get() if outputs is not self for k in outputs.claims}
        taken = {_identity(c.target) for c in self.claims.values()} - {None}
        fresh: dict[_Key, Path] = {}
        try:
            for path in paths:
                self._check(path, suffix, make_folders)
                key, ident = _key(path), _identity(path)
                if key in self.claims or key in fresh or (ident is not None and ident in taken):
                    raise OrthoLoraError("two outputs of this run would be written to this file", path)
                if ident is not None and ident in sources:
                    raise OrthoLoraError("is also an input of this run: writing it would destroy that input", path)
                taken.add(ident)
                if key in enclosing:
                    continue
                if not overwrite and os.path.lexists(path):
                    raise OutputExists(path)
                fresh[key] = path
            for folder in dict.fromkeys(p.parent for p in fresh.values()):
                self.removed += remove_stale_temps(folder)
            for key, path in fresh.items():
                tmp, fd = _create_temp(path)
                self.claims[key] = Claim(path, tmp, fd, overwrite)
        except BaseException:
            self.discard()
            raise
        return paths

    def _check(self, path: Path, suffix: str | None, make_folders: bool) -> None:
        """A file name with the right suffix, in a folder that exists (made here if asked)."""
        if suffix and path.suffix.lower() != suffix:
            raise OrthoLoraError(f"output must be a {suffix} file (that is what the toolbox writes)", path)
        if path.is_dir():
            raise OrthoLoraError("is a folder", path)
        if path.parent.is_dir():
            return
        if not make_folders:
            raise OrthoLoraError("output folder does not exist", path)
        missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
        try:
            path.parent.mkdir(parents=True)
        except OSError as err:
            raise OrthoLoraError(f"cannot create the output folder: {err.strerror or err}", path.parent) from err
        self._made += missing

    def publish(self) -> list[Path]:
        """Move every written temp onto its target (all or none), drop the unwritten ones; returns
        the targets written."""
        written = [c for c in self.claims.values() if c.written]
        moved: list[Claim] = []
        try:
            for c in written:
                try:
                    c.prepare()
                except OSError as err:
                    raise write_error(err, c.target) from err
            for c in written:
                try:
                    c.move()
                except OSError as err:
                    raise write_error(err, c.target) from err
                moved.append(c)
        except BaseException:
            for c in moved:
                if c.created:
                    c.target.unlink(missing_ok=True)
            self.discard()
            raise
        for folder in dict.fromkeys(c.target.parent for c in written):
            _fsync_folder(folder)
        self.discard()
        self.published += [c.target for c in written]
        return [c.target for c in written]

    def discard(self) -> None:
        """Remove every temp file still there, and the folders the claim made if left empty."""
        claims, self.claims = list(self.claims.values()), {}
        for c in claims:
            c.release()
        for folder in sorted(self._made, key=lambda p: len(p.parts), reverse=True):
            try:
                folder.rmdir()
            except OSError:  # not empty: someone else's files are there too
                pass
        self._made = []


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # not every platform/filesystem can fsync a folder; the files themselves are synced
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: PathLike, overwrite: bool = False, suffix: str | None = None) -> Iterator[Path]:
    """The temp file to write `path` into: the claim of a run in progress (which publishes it),
    else a claim of its own, published when the block ends without error."""
    claim = claimed(path)
    if claim is None:
        with Outputs() as outputs:
            outputs.claim([path], overwrite=overwrite, suffix=suffix)
            with atomic_output(path) as tmp:
                yield tmp
        return
    yield claim.tmp
    claim.written = True
