"""The one atomic writer: every file and folder headclass writes goes through here.

A reader (or a crash) never sees a half-written file: content is written to a hidden
temporary name beside the target, flushed, and renamed over the target with ``os.replace``,
which is atomic within one filesystem. On any failure the temporary is removed and the target
is exactly as it was (absent, or with its old content).

* :func:`atomic_write` -- one file, written by a callback that receives the temporary path;
* :func:`write_text` / :func:`write_bytes` -- the common cases of it;
* :func:`atomic_folder` -- a whole folder (a model cache entry, a trained toy model) built in a
  staging folder beside the target and renamed into place.

* :func:`check_output_folder` and :class:`FolderPublication` -- a *set* of files published
  into an output folder all or nothing (the CLI's ``--out``): staged beside the targets,
  moved in together, and every step undone if one fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

from headclass.errors import HeadclassError

__all__ = [
    "atomic_write",
    "write_text",
    "write_bytes",
    "atomic_folder",
    "check_output_folder",
    "FolderPublication",
    "PublishError",
    "MANIFEST_NAME",
    "sigint_pending",
]

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, write_to: Callable[[Path], None]) -> Path:
    """Call ``write_to(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    The temporary keeps ``path``'s suffix (some writers pick the format from it). If
    ``write_to`` raises (or the rename fails), the temporary is removed, ``path`` is left as
    it was, and the exception propagates. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_to(tmp)
        _chmod_like(tmp, target)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _chmod_like(tmp: Path, target: Path) -> None:
    """Give the temporary (``mkstemp`` makes it 0600) the target's mode, or for a new file the
    mode a plain ``open()`` would give (0666 less the umask)."""
    try:
        mode = target.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(tmp, mode)


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` line ends) to ``path`` atomically."""

    def write_to(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    return atomic_write(path, write_to)


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""

    def write_to(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    return atomic_write(path, write_to)


@contextlib.contextmanager
def atomic_folder(target: PathLike) -> Iterator[Path]:
    """Build a folder in a staging folder beside ``target``; rename it into place on success.

    Yields the staging path to fill. On a clean exit the staging folder becomes ``target``
    (if another writer finished first, its folder is kept and ours discarded: both hold the
    same content by construction of the callers, cache entries keyed by their inputs). On an
    exception the staging folder is removed and ``target`` is untouched.
    """
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging_root = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".staging", dir=final.parent))
    staging = staging_root / final.name
    staging.mkdir()
    try:
        yield staging
        try:
            os.replace(staging, final)
        except OSError:
            if not final.is_dir():  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)


# -- publishing a set of files all or nothing ------------------------------------------------------


class PublishError(HeadclassError, OSError):
    """An output folder cannot be used, or its files could not be published (nothing was changed)."""


def check_output_folder(out: PathLike, option: str = "--out") -> Path:
    """Check, before any work, that ``out`` can become (or already is) a writable folder.

    Refuses an empty path, an existing non-folder, a path below a regular file, and a folder
    (or, for a new folder, its nearest existing parent) the user cannot write to. Returns the
    path, ``~`` expanded. Nothing is created.
    """
    text = os.fspath(out) if isinstance(out, (str, os.PathLike)) else out
    if not isinstance(text, str) or text.strip() == "":
        raise PublishError(f"{option} is empty; give a folder, e.g. {option} report/.")
    path = Path(text).expanduser()
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise PublishError(f"{option} {text!r} exists and is not a folder; give a folder (new or existing).")
        if not os.access(path, os.W_OK | os.X_OK):
            raise PublishError(
                f"{option} folder {text!r} is not writable; choose another folder or fix its permissions."
            )
        return path
    parent = _nearest_existing(path)
    if not parent.is_dir():
        raise PublishError(f"{option} {text!r} cannot be created: {str(parent)!r} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PublishError(
            f"{option} {text!r} cannot be created: folder {str(parent)!r} is not writable; "
            "choose another folder or fix its permissions."
        )
    return path


class FolderPublication:
    """Files staged beside (or inside) an output folder, published into it all or nothing.

    Use as a context manager: write each file to :meth:`path` (``name`` is a plain file name),
    then call :meth:`commit`. Until the commit, the output folder is untouched. The commit
    moves every staged file in with ``os.replace`` (atomic per file) after moving aside the
    files it replaces or removes; if any step fails (or raises ``KeyboardInterrupt``), every
    step already done is undone in reverse, so the folder is exactly as before (for a new
    folder: absent, with no parent left created). The staging folder is always removed on
    exit. During the commit, SIGINT (Ctrl-C) is held back until the commit is complete or
    rolled back, so an interrupt never splits a publication.

    Parameters
    ----------
    out
        The output folder (created if missing, with its parents).
    owned
        Names of existing files the publication may replace or remove (those a previous
        run wrote). Any other existing file a staged name would replace is an error.
    """

    def __init__(self, out: PathLike, *, owned: Iterable[str] = ()):
        self.out = Path(out).expanduser()
        self.owned = set(owned)
        self.written: list[str] = []
        self.removed: list[str] = []
        self.committed = False
        self._root: Optional[Path] = None
        self._keep_staging = False  # set when an undo failed: the staging folder holds old files

    # -- staging ---------------------------------------------------------------------------------
    def __enter__(self) -> "FolderPublication":
        base = self.out if self.out.is_dir() else _nearest_existing(self.out)
        try:
            self._root = Path(tempfile.mkdtemp(prefix=".headclass-staging-", dir=base))
        except OSError as exc:
            raise PublishError(
                f"cannot stage the outputs in {str(base)!r} ({_reason(exc)}); nothing in {str(self.out)!r} was changed."
            ) from None
        try:
            (self._root / "new").mkdir()
        except BaseException as exc:  # __exit__ does not run when __enter__ fails
            _remove_tree(self._root)
            raise _publish_error(self.out, exc) from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._root is not None and self._root.exists() and not self._keep_staging:
            _remove_tree(self._root)

    @property
    def staging(self) -> Path:
        """The staging folder (hidden, removed on exit)."""
        if self._root is None:
            raise RuntimeError("FolderPublication is used as a context manager")
        return self._root

    def path(self, name: str) -> Path:
        """Where to write the file ``name`` (a plain file name, no folder part)."""
        if not name or name in (".", "..") or "/" in name or os.sep in name or name.startswith(".headclass-staging-"):
            raise PublishError(f"output file name {name!r} must be a plain file name.")
        return self.staging / "new" / name

    def staged(self) -> list[str]:
        """Names of the files staged so far, sorted (a writer's hidden temporaries excluded)."""
        return sorted(p.name for p in (self.staging / "new").iterdir() if not p.name.startswith("."))

    # -- commit ------------------------------------------------------------------------------------
    def commit(self, *, remove: Iterable[str] = (), on_hold: Optional[Callable[[], None]] = None) -> list[str]:
        """Publish every staged file and remove ``remove`` (owned names no longer written).

        Returns the names written; :attr:`removed` lists the names removed. Raises
        :class:`PublishError` (nothing changed) on failure. ``on_hold`` is called once SIGINT
        is held, before the first move (the CLI's tests interrupt a publication there).
        """
        names = self.staged()
        for entry in (self.staging / "new").iterdir():  # a writer's temporaries, should any remain
            if entry.name.startswith("."):
                if entry.is_dir():
                    _remove_tree(entry)
                else:
                    entry.unlink()
        remove = [n for n in remove if n not in names]
        with _sigint_held():
            if on_hold is not None:
                on_hold()
            if self.out.is_dir():
                self._swap_files(names, remove)
            else:
                self._move_folder()
            self.committed = True
            self.written = names
        return names

    def _move_folder(self) -> None:
        created: list[Path] = []
        new = self.staging / "new"
        try:
            for parent in reversed(_missing_parents(self.out)):
                os.mkdir(parent)
                created.append(parent)
            os.rename(new, self.out)
        except BaseException as exc:
            for parent in reversed(created):
                with contextlib.suppress(OSError):
                    os.rmdir(parent)
            raise _publish_error(self.out, exc) from None

    def _swap_files(self, names: Sequence[str], remove: Sequence[str]) -> None:
        out, new, old = self.out, self.staging / "new", self.staging / "old"
        for name in [*names, *remove]:
            target = out / name
            if target.is_symlink() or (target.exists() and not target.is_file()):
                kind = "a folder" if target.is_dir() else "not a regular file"
                raise PublishError(
                    f"cannot write {str(target)!r}: it is {kind}; move it away or choose "
                    f"another --out. Nothing in {str(out)!r} was changed."
                )
            if target.exists() and name not in self.owned:
                raise PublishError(
                    f"{str(target)!r} exists and was not written by headclass (not listed in "
                    f"{MANIFEST_NAME}); move it away or choose another --out. Nothing in {str(out)!r} was changed."
                )
        journal: list[tuple[str, str]] = []
        try:
            os.mkdir(old)
            for name in names:
                if (out / name).exists():
                    os.replace(out / name, old / name)
                    journal.append(("aside", name))
                os.replace(new / name, out / name)
                journal.append(("in", name))
            for name in remove:
                if (out / name).exists():
                    os.replace(out / name, old / name)
                    journal.append(("aside", name))
            _fsync_folder(out)
        except BaseException as exc:
            failed = []
            for step, name in reversed(journal):
                try:
                    if step == "in":
                        os.replace(out / name, new / name)
                    else:
                        os.replace(old / name, out / name)
                except OSError:
                    failed.append(name)
            if failed:  # keep the staging folder: it holds the previous files
                self._keep_staging = True
                raise PublishError(
                    f"publishing to {str(out)!r} failed ({_reason(exc)}) and restoring "
                    f"{', '.join(failed)} failed too; the previous files are in {str(old)!r}."
                ) from None
            raise _publish_error(out, exc) from None
        self.removed = [name for step, name in journal if step == "aside" and name in remove]


MANIFEST_NAME = "headclass-run.json"


def _publish_error(out: Path, exc: BaseException) -> BaseException:
    if isinstance(exc, KeyboardInterrupt):
        return exc
    if isinstance(exc, PublishError):
        return exc
    return PublishError(
        f"cannot publish the outputs to {str(out)!r} ({_reason(exc)}); nothing in {str(out)!r} was changed."
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return str(exc) or type(exc).__name__


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    current = Path(os.path.abspath(path))
    while not current.exists() and current.parent != current:
        current = current.parent
    return current


def _missing_parents(path: Path) -> list[Path]:
    """Ancestors of ``path`` that do not exist, nearest first."""
    missing, current = [], Path(os.path.abspath(path)).parent
    while not current.exists() and current.parent != current:
        missing.append(current)
        current = current.parent
    return missing


def _remove_tree(path: Path, attempts: int = 3) -> None:
    """Remove a staging folder; retried, since a transient failure must not leave it behind."""
    for _ in range(attempts):
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            return
        except OSError:
            continue
        if not path.exists():
            return


def _fsync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable (POSIX; a failure here fails the publication)."""
    if os.name == "nt":  # pragma: no cover - folders cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold back SIGINT for the duration (main thread only); re-raise it afterwards."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held.clear()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: _held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if _held:
        _held.clear()
        raise KeyboardInterrupt


_held: list[int] = []


def sigint_pending() -> bool:
    """Whether a Ctrl-C arrived while a publication held SIGINT back (raised when it ends)."""
    return bool(_held)
