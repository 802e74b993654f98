"""Where surgeon writes: output checks made before any work starts, and crash-safe publication.

`check_folder` / `check_file` refuse, in one line, an output that lies under a file, is a symbolic
link, sits in a system folder (/proc, /sys, /usr, ...), is the working directory or one of its
parents, or would replace an input being read. An existing output is replaced only with `force`, and
a folder only when it is a previous surgeon save (it holds `recipe.json`) or empty: `--force` never
deletes anything else.

`publish` moves a completely written temporary folder into place with renames only, so a process
killed at any moment leaves either the previous save or the new one:
1. rename TMP -> DIR: atomic, and it fails when DIR is a non-empty folder or a file (another process
   saved there meanwhile), so without force nothing is ever deleted (an empty folder is replaced);
2. with force: rename DIR -> .DIR.old, rename TMP -> DIR, then delete .DIR.old (its recipe.json
   first, so a half-deleted folder is never mistaken for a save).
`recover` tidies what a killed process left: a complete .DIR.old without DIR is renamed back (the
previous save), anything else beside a complete DIR is deleted; temporary folders of dead
processes (.DIR.tmp-PID-*) are deleted by the next save.
NOTE: nothing is fsync'ed: this survives a killed process, not a power cut mid-write.
"""
from __future__ import annotations

import errno
import glob
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from surgeon.errors import OutputError

log = logging.getLogger("surgeon")

MARKER = "recipe.json"  # what makes a folder a surgeon save (checkpoint.RECIPE)
# folders of the operating system: nothing of surgeon's belongs under them
SYSTEM = tuple(Path(p) for p in ("/proc", "/sys", "/dev", "/boot", "/etc", "/bin", "/sbin", "/lib", "/lib64",
                                 "/usr", "/run"))


def is_save(folder: Path) -> bool:
    """A folder written by surgeon (it holds recipe.json); symbolic links are never saves."""
    return not folder.is_symlink() and folder.is_dir() and (folder / MARKER).is_file()


def _empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_place(path: str | os.PathLike, *, reading: Iterable[str | os.PathLike] = (),
                what: str = "Output folder") -> None:
    """Refuse a path that no output may take, whether or not it exists (see the module docstring)."""
    raw = os.fspath(path)
    if not raw or "\0" in raw:
        raise OutputError(f"{what} {raw!r} is not a usable path")
    path = Path(raw)
    shown = f"{what} {raw!r}"
    if path.is_symlink():
        raise OutputError(f"{shown} is a symbolic link; name the real location instead")
    real = Path(os.path.realpath(path))
    for system in SYSTEM:
        if real == system or system in real.parents:
            raise OutputError(f"{shown} is in the system folder {str(system)!r}; write somewhere of your own")
    cwd = Path(os.path.realpath(os.getcwd()))
    if real == cwd or real in cwd.parents:
        raise OutputError(f"{shown} is the working directory or one of its parents; name a new folder "
                          f"inside it")
    for item in reading:
        source = Path(os.path.realpath(item))
        if real == source or real in source.parents:
            raise OutputError(f"{shown} would replace the input {str(item)!r} that this command reads; "
                              f"name another output")
    parent = real.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{shown} is under {str(parent)!r}, which is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{shown}: cannot write in {str(parent)!r} (permission denied)")


def local_inputs(*items: str | os.PathLike | None) -> list[str]:
    """The files and folders among a command's inputs, for `reading`: paths that exist, and the file
    of a 'path/to/file.py:factory' model reference (model names and 'digits' are skipped)."""
    found = []
    for item in items:
        path = os.fspath(item) if item else ""
        if path.rpartition(":")[0].endswith(".py"):
            path = path.rpartition(":")[0]
        if path and "\0" not in path and os.path.lexists(path):
            found.append(path)
    return found


def check_folder(path: str | os.PathLike, *, force: bool = False, reading: Iterable[str | os.PathLike] = (),
                 what: str = "Output folder") -> Path:
    """Refuse an output folder that cannot or may not be written, before any work is done (after
    tidying what an interrupted save left beside it, see `recover`).

    Args:
        force: allow replacing an existing folder, when it is a previous surgeon save or empty.
        reading: inputs of the command; the output may neither be one nor contain one.

    Raises:
        OutputError: one line naming the path and what is wrong with it.
    """
    target = Path(path)
    check_place(target, reading=reading, what=what)
    recover(target)
    if not os.path.lexists(target):
        return target
    if not target.is_dir():
        raise OutputError(f"{what} {str(target)!r} is a file; name a folder")
    if not force:
        raise OutputError(f"{what} {str(target)!r} exists; pass --force (force=True) to replace it")
    if not (is_save(target) or _empty_folder(target)):
        raise OutputError(f"{what} {str(target)!r} exists and is not a surgeon save (no {MARKER}); --force "
                          f"only replaces surgeon saves. Name another folder, or remove it yourself")
    return target


def check_file(path: str | os.PathLike, *, force: bool = False, reading: Iterable[str | os.PathLike] = (),
               what: str = "Output file") -> Path:
    """Like `check_folder` for one output file: an existing regular file is replaced only with force."""
    target = Path(path)
    check_place(target, reading=reading, what=what)
    if target.is_dir():
        raise OutputError(f"{what} {str(target)!r} is a folder; name the file to write in it")
    if os.path.lexists(target) and not force:
        raise OutputError(f"{what} {str(target)!r} exists; pass --force (force=True) to replace it")
    if os.path.lexists(target) and not target.is_file():
        raise OutputError(f"{what} {str(target)!r} exists and is not a regular file; name another file")
    return target


# -- writing -----------------------------------------------------------------------------------------
def _aside(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _discard(folder: Path) -> None:
    """Delete a folder that is no longer a save: its marker first, so that if this is interrupted
    what remains is never taken for a save."""
    try:
        (folder / MARKER).unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass
    shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(target: Path) -> None:
    """Tidy what a save killed midway left beside `target` (see the module docstring)."""
    aside = _aside(target)
    if os.path.lexists(aside) and not aside.is_symlink():
        if not os.path.lexists(target) and is_save(aside):
            log.warning("restoring %s from %s, left by an interrupted save", target, aside.name)
            try:
                os.rename(aside, target)
            except OSError:  # another process got there first
                pass
        elif is_save(target) or not is_save(aside):
            _discard(aside)
    for tmp in glob.glob(glob.escape(str(target.parent / _tmp_prefix(target))) + "*"):
        pid = Path(tmp).name[len(_tmp_prefix(target)):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def make_parents(target: Path) -> list[Path]:
    """Create the missing parents of `target`; returns them, deepest first, for `remove_empty`."""
    made = []
    parent = target.parent
    while not parent.exists():
        made.append(parent)
        parent = parent.parent
    for p in reversed(made):
        p.mkdir(exist_ok=True)
    return made


def remove_empty(folders: Iterable[Path]) -> None:
    """Remove folders `make_parents` created, when a write failed and they stayed empty."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            break


def temporary_folder(target: Path) -> Path:
    """A private folder beside `target`, named after it and this process (see `recover`)."""
    return Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(target)}{os.getpid()}-", dir=target.parent))


def publish(tmp: Path, target: Path, *, force: bool) -> None:
    """Move the complete folder `tmp` to `target`: renames only; an existing `target` is replaced
    only with force and only when it is a surgeon save or empty.

    Raises:
        OutputError: `target` appeared meanwhile (another save), or is not a save; `tmp` stays for
        the caller to remove.
    """
    try:
        os.rename(tmp, target)  # fails on a non-empty folder or a file: never replaces a save silently
        return
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
    if not force:
        raise OutputError(f"Output folder {str(target)!r} appeared while saving (another save to the same "
                          f"folder?); it was left as it is, and nothing was written")
    if not is_save(target):
        raise OutputError(f"Output folder {str(target)!r} is not a surgeon save (no {MARKER}); --force only "
                          f"replaces surgeon saves")
    aside = _aside(target)
    if os.path.lexists(aside):
        _discard(aside)  # left by an earlier interrupted save; `target` is newer
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except OSError as exc:
        try:
            os.rename(aside, target)
        except OSError:  # another save took `target`: it is complete and newer than ours
            _discard(aside)
        raise OutputError(f"Output folder {str(target)!r} was written by another process while saving; "
                          f"it was left as it is") from exc
    _discard(aside)
