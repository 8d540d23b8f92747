"""The output policy of every operation, in one place: claim every output before any work, write
each into its own temp file, publish them all at the end, or none.

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
Every lock file, temp file and folder is recorded before it is made: an interrupt (Ctrl-C, or a
stop signal raised in the main thread) that lands just after it was made still has it removed.

Temp files are `.<target name>.ortholora-<token>.tmp` beside the target, `token` (12 hex) being
the run's. Before its first temp file in a folder, a run creates `.ortholora-<token>.lock` there
under a `.new` name, takes an exclusive `flock` on it, renames it into place, and holds it until
its temp files are gone (one open file per folder, however many outputs). So the temp files of a
token whose lock file is missing or can be locked belong to no live run: they are stale. (Without
`fcntl`, on Windows, the held lock file cannot be deleted, which gives the same test.)

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
from .paths import SAFETENSORS, PathLike

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

EXISTS = "exists; pass overwrite to replace it"
_TEMP = re.compile(r"\..*\.ortholora-([0-9a-f]{12})\.tmp")
_LOCK = re.compile(r"\.ortholora-([0-9a-f]{12})\.lock")
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
    """One claimed target and the temp file its writer writes."""

    target: Path
    tmp: Path
    overwrite: bool
    written: bool = False
    created: bool = False

    def prepare(self) -> None:
        """The steps of publishing that can fail: sync the data, give it the replaced file's mode."""
        fd = os.open(self.tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
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


def _create(path: Path) -> int:
    """Create `path`, which must not exist; its open descriptor."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)


class _FolderLock:
    """A run's lock file in one folder (see the module docstring), taken by `acquire`, held until
    `release`. Made before its file exists, so that its owner can record it first: an interrupt
    (Ctrl-C, SIGTERM) that lands while the file is being made still has `release` remove it."""

    def __init__(self, folder: Path, token: str):
        self.folder = folder
        self.path = folder / f".ortholora-{token}.lock"
        self._first = self.path.with_name(self.path.name + ".new") if fcntl else self.path
        self._names = (self._first, self.path)  # what release removes: names only this run uses
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            self.fd = _create(self._first)
        except OSError as err:
            self._names = ()  # not made here: nothing to remove
            raise write_error(err, self.folder) from err
        try:
            if fcntl:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(self._first, self.path)
        except OSError as err:
            self.release()
            raise write_error(err, self.folder) from err

    def release(self) -> None:
        try:
            for name in self._names:
                name.unlink(missing_ok=True)
        finally:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


@contextmanager
def _gone(lock: Path) -> Iterator[bool]:
    """Whether the run of this lock file is gone: the file is missing, or its lock is free (then
    held here while the block removes that run's files)."""
    if fcntl is None:
        try:
            lock.unlink()  # refused while its run holds it open
        except FileNotFoundError:
            pass
        except OSError:
            yield False
            return
        yield True
        return
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        yield True
        return
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its run is alive
            yield False
            return
        st = os.fstat(fd)
        yield _identity(lock) in (None, (st.st_dev, st.st_ino))
    finally:
        os.close(fd)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temp files (and lock files) of our naming in `folder` whose run is gone; returns
    the temp files removed."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    by_token: dict[str, list[Path]] = {}
    for name in names:
        temp, lock = _TEMP.fullmatch(name), _LOCK.fullmatch(name)
        if temp or lock:
            by_token.setdefault((temp or lock)[1], []).extend([folder / name] if temp else [])
    removed = []
    for token, temps in by_token.items():
        lock = folder / f".ortholora-{token}.lock"
        with _gone(lock) as gone:
            if not gone:
                continue
            for path in temps:
                try:
                    path.unlink()
                except OSError:
                    continue
                removed.append(path)
            lock.unlink(missing_ok=True)
    return removed


_ACTIVE: ContextVar[tuple["Outputs", ...]] = ContextVar("ortholora_outputs", default=())


def claimed(path: PathLike) -> Claim | None:
    """The claim of `path` by a run in progress (innermost first), if any."""
    key = _key(Path(os.fsdecode(path)))
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
        self.token = secrets.token_hex(6)
        self._locks: dict[Path, _FolderLock] = {}
        self._made: list[Path] = []
        self._context = None

    def __enter__(self) -> Outputs:
        self._context = _ACTIVE.set(_ACTIVE.get() + (self,))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _ACTIVE.reset(self._context)
        if exc_type is None:
            self.publish()
        else:
            self.discard()

    def claim(self, targets: Iterable[PathLike], *, inputs: Iterable[PathLike | None] = (), overwrite: bool = False,
              suffix: str | None = SAFETENSORS, make_folders: bool = False) -> list[Path]:
        """Claim `targets` (refusals: see the module docstring); returns them as paths, in order."""
        paths = [Path(os.fsdecode(t)) for t in targets]
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
                if folder not in self._locks:
                    self.removed += remove_stale_temps(folder)
                    self._locks[folder] = lock = _FolderLock(folder, self.token)  # recorded, then made:
                    lock.acquire()  # an interrupt in between still has discard remove it
            for key, path in fresh.items():
                self.claims[key] = Claim(path, self._temp(path), overwrite)  # the same order
                self._create_temp(key)
        except BaseException:
            self.discard()
            raise
        return paths

    def _temp(self, target: Path) -> Path:
        """The name of `target`'s temp file (this run's token makes it this run's own)."""
        return target.with_name(f".{target.name[:150]}.ortholora-{self.token}.tmp")

    def _create_temp(self, key: _Key) -> None:
        """Make the claim's temp file, new and empty."""
        claim = self.claims[key]
        try:
            os.close(_create(claim.tmp))
        except OSError as err:
            del self.claims[key]  # not made here: not for discard to remove
            raise write_error(err, claim.target) from err

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
        self._made += missing  # recorded first, as the lock and temp files are (discard skips what is not there)
        try:
            path.parent.mkdir(parents=True)
        except OSError as err:
            del self._made[len(self._made) - len(missing):]  # not made here (one may be someone else's)
            raise OrthoLoraError(f"cannot create the output folder: {err.strerror or err}", path.parent) from err

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
        """Remove every temp file still there, then the lock files, then the folders the claim
        made if left empty."""
        claims, self.claims = list(self.claims.values()), {}
        for c in claims:
            c.tmp.unlink(missing_ok=True)
        locks, self._locks = list(self._locks.values()), {}
        for lock in locks:
            lock.release()
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
