"""Writing and removing files safely: the one place that makes temporaries, renames outputs into place, records what
qmilora wrote, and decides what it may remove.

- A temporary is a directory that `mkdtemp` creates beside its target (an unpredictable name, made by mkdir itself,
  so nothing planted at a guessable name is followed) holding a marker that names its process; files inside are
  opened with O_EXCL | O_NOFOLLOW. Leftovers of a killed process are recognised by that marker and their owner,
  never by the shape of a name.
- Outputs follow the user's umask (0644 / 0755 under 022); the cache is private (0600 / 0700): its entries are
  loaded without a second look once they verify, so nobody else may write or read them.
- A manifest records each file qmilora wrote (relative path, size, sha256). Removal deletes only files whose bytes
  still match their record, then folders that became empty; anything else stays, and callers refuse beforehand.
- An output may not be, contain, or lie inside an input (symlinks resolved).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile

from .config import QMiLoRAError

MARKER = ".qmilora-temporary"
MANIFEST = "qmilora-output.json"  # the record of an export or report folder (a run folder records in qmilora.json)


# --- modes ---------------------------------------------------------------------------------------------------------
def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_dir_mode() -> int:
    """The mode a plain mkdir gives under the user's umask."""
    return 0o777 & ~umask()


def modes(private: bool) -> tuple[int, int]:
    """(file mode, directory mode) of what qmilora writes."""
    if private:
        return 0o600, 0o700
    return 0o666 & ~umask(), 0o777 & ~umask()


def set_modes(path: str, private: bool = False) -> None:
    """Give `path` and everything below it the modes of a plain write under the umask (or private ones): libraries
    that write through temporary files (safetensors, mkdtemp) leave 0600 / 0700 behind, which a teammate or a serving
    account cannot read. Symlinks are neither followed nor changed."""
    file_mode, dir_mode = modes(private)
    for folder, dirs, names in os.walk(path):
        os.chmod(folder, dir_mode)
        for name in names:
            full = os.path.join(folder, name)
            if not os.path.islink(full):
                os.chmod(full, file_mode)


# --- temporaries -----------------------------------------------------------------------------------------------------
def make_temporary(parent: str, name: str) -> str:
    """A new private directory in `parent` for building `name`, marked as this process's temporary."""
    tmp = tempfile.mkdtemp(prefix=f".{name}.qmilora-", dir=parent)
    fd = os.open(os.path.join(tmp, MARKER), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:  # its own name too: a temporary renamed (to rescue it) is no longer one
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "name": os.path.basename(tmp)}, f)
    return tmp


def _seal(tmp: str, private: bool) -> None:
    """Make a finished temporary an ordinary folder: no marker, the output's modes."""
    os.remove(os.path.join(tmp, MARKER))
    set_modes(tmp, private)


def open_new(path: str, mode: int = 0o666):
    """A new file opened for writing that refuses to exist already or to be a symlink."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode), "wb")


def write_atomic(path: str, data: bytes, private: bool = False) -> None:
    """Write a file in a fresh temporary beside it, then rename it into place (a symlink at `path` is replaced,
    never written through)."""
    path = real_target(path)
    parent = os.path.dirname(path)
    tmp = make_temporary(parent, os.path.basename(path))
    try:
        staged = os.path.join(tmp, "data")
        with open_new(staged, modes(private)[0]) as f:
            f.write(data)
        os.chmod(staged, modes(private)[0])
        os.replace(staged, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str, overwrite: bool = False, private: bool = False, own_only: str | None = None):
    """Yield a temporary directory beside `target`; on success rename it to `target`, on error remove it.

    A process killed midway leaves only a marked temporary, never a half-written `target`; the next atomic write in
    the same folder removes such leftovers of processes that are no longer running. Without `overwrite` only a
    missing or empty `target` is replaced, decided by the rename itself (so also for a folder made meanwhile).
    `overwrite` replaces an existing `target` whole: the caller has checked that it holds only what qmilora wrote
    there. With `own_only` (the flag that allows replacing, for messages) that is checked again in place, at the
    end, and the folder is moved aside only if no entry changed since that check began (compared by inode, size and
    times): a file added or edited while an export ran stops it with the folder as it is. The folder moved aside
    waits in an unmarked folder (no cleanup removes it) and is put back on any failure.
    """
    target = real_target(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(parent)
    tmp = make_temporary(parent, os.path.basename(target))
    try:
        yield tmp
        _seal(tmp, private)
        if not overwrite or not os.path.lexists(target):
            try:
                os.rename(tmp, target)  # onto nothing or an empty folder; anything else stays and is refused
            except OSError:
                if not os.path.lexists(target):
                    raise
                hint = f"; pass {own_only} to replace it" if own_only else ""
                raise QMiLoRAError(f"output {target} already exists and is not an empty folder{hint}") from None
            return
        if own_only:
            seen = _entries(target)
            problem = _replace_problem(target, target, own_only)
            if problem:
                raise QMiLoRAError(f"{problem}; nothing was replaced")
        holder = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.qmilora-replacing-", dir=parent)
        moved = os.path.join(holder, "old")
        os.rename(target, moved)
        try:
            if own_only and _entries(moved) != seen:
                raise QMiLoRAError(f"output {target} changed while it was checked (a file added, removed or edited)")
            os.rename(tmp, target)
        except BaseException as err:
            kept = _put_back(moved, target)
            if kept != moved:
                os.rmdir(holder)
            if isinstance(err, QMiLoRAError):
                raise QMiLoRAError(f"{err}; " + ("nothing was replaced" if kept == target else f"it is kept as {kept}"))
            raise
        shutil.rmtree(holder, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _entries(folder: str) -> dict[str, tuple]:
    """{relative path: (inode, size, mtime, ctime, mode)} of everything under `folder` (itself aside: moving it
    changes its own times only)."""
    out = {}
    for base, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = os.path.join(base, name)
            st = os.lstat(path)
            out[os.path.relpath(path, folder)] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)
    return out


def _put_back(moved: str, target: str) -> str:
    """Move a folder that must not be replaced back to `target`, else (made again meanwhile) beside it; returns
    where it is."""
    for place in (target, f"{target}.kept-{os.getpid()}"):
        try:
            os.rename(moved, place)
            return place
        except OSError:
            pass
    return moved


def real_target(path: str) -> str:
    """Where `path` lands once the kernel resolves it: its folder with symlinks resolved (`link/../x` is not
    `./x` when `link` points elsewhere), so that temporaries are made beside the real target."""
    path = os.path.expanduser(path).rstrip(os.sep) or os.sep
    head, name = os.path.split(path)
    if name in ("", ".", ".."):
        return os.path.realpath(path)
    return os.path.join(os.path.realpath(head or "."), name)


def remove_stale_temporaries(parent: str) -> list[str]:
    """Remove this user's marked temporaries in `parent` whose process (on this host) has ended: a killed write's
    half-written output, up to a whole merged model. Returns what was removed."""
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    host = socket.gethostname()
    for entry in entries:
        path = os.path.join(parent, entry)
        try:
            st = os.lstat(path)
            marker = os.path.join(path, MARKER)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue
            mst = os.lstat(marker)  # written by this user, as a file, naming this very folder
            if not stat.S_ISREG(mst.st_mode) or mst.st_uid != os.geteuid():
                continue
            with open(marker) as f:
                owner = json.load(f)
            if owner.get("name") != entry or owner.get("host") != host or _alive(int(owner["pid"])):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- ownership ---------------------------------------------------------------------------------------------------------
def check_private(path: str, what: str) -> None:
    """Refuse a folder that another account owns or may write (as pip, ssh and the Hugging Face cache do): whatever
    it holds could have been planted."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        if st.st_uid != os.geteuid():
            raise QMiLoRAError(f"{what} {path} is a symlink another user (uid {st.st_uid}) made; use a folder of "
                               "your own")
        st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise QMiLoRAError(f"{what} {path} is not a directory; point it at a folder of your own")
    if st.st_uid != os.geteuid():
        raise QMiLoRAError(f"{what} {path} belongs to another user (uid {st.st_uid}); use a folder of your own "
                           "(QMILORA_CACHE or cache_dir)")
    if st.st_mode & 0o022:
        raise QMiLoRAError(f"{what} {path} can be written by other users (mode {stat.S_IMODE(st.st_mode):o}); run "
                           f"chmod go-w {path}, or use a folder of your own")


def check_own_output(path: str, what: str) -> None:
    """Refuse an existing output folder that another account owns or that everyone may write (a folder pre-made in
    /tmp by someone else): its owner could swap links into it while qmilora writes. Group-writable is the user's
    choice (umask 002) and is kept."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) and st.st_uid != os.geteuid():
        raise QMiLoRAError(f"{what} {path} is a symlink another user (uid {st.st_uid}) made; write to a folder of "
                           "your own")
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        raise QMiLoRAError(f"{what} {path} belongs to another user (uid {st.st_uid}); write to a folder of your own")
    if st.st_mode & 0o002:
        raise QMiLoRAError(f"{what} {path} can be written by every user (mode {stat.S_IMODE(st.st_mode):o}); run "
                           f"chmod o-w {path}, or write to a folder of your own")


def private_dir(path: str, what: str) -> str:
    """`path` as a private folder of this user: created 0700 when missing, refused when another account owns or may
    write it. A parent that is a file or read-only is refused in one line."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise QMiLoRAError(f"{what} {path}: {probe} is a file, not a directory")
    if not os.path.exists(path):
        if not os.access(probe, os.W_OK | os.X_OK):
            raise QMiLoRAError(f"{what} {path} cannot be created: {probe} is not writable")
        os.makedirs(path, mode=0o700, exist_ok=True)
    check_private(path, what)
    return path


# --- manifests ---------------------------------------------------------------------------------------------------------
def manifest(folder: str, skip: tuple[str, ...] = ()) -> dict[str, list]:
    """{relative path: [size, sha256]} of every regular file under `folder` (except the names in `skip`)."""
    from .checkpoint import file_digest

    found = {}
    for base, dirs, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            rel = os.path.relpath(path, folder)
            if rel in skip or os.path.islink(path):
                continue
            found[rel] = [os.path.getsize(path), file_digest(path)]
    return found


def matches(path: str, record) -> bool:
    from .checkpoint import file_digest

    try:
        st = os.lstat(path)
        return stat.S_ISREG(st.st_mode) and st.st_size == record[0] and file_digest(path) == record[1]
    except (OSError, TypeError, IndexError):
        return False


def foreign(folder: str, recorded: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """What under `folder` is not a file qmilora recorded with these bytes: other files, changed files, symlinks
    (relative paths; `skip` names files the caller owns otherwise)."""
    out = []
    for base, dirs, names in os.walk(folder):
        for name in sorted(dirs):
            rel = os.path.relpath(os.path.join(base, name), folder)
            if os.path.islink(os.path.join(base, name)) or not any(r.startswith(rel + os.sep) for r in recorded):
                out.append(rel + os.sep)  # a link, or a folder holding nothing qmilora wrote (a user's, if empty)
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(base, name), folder)
            if rel not in skip and (rel not in recorded or not matches(os.path.join(folder, rel), recorded[rel])):
                out.append(rel)
    return out


def remove_recorded(folder: str, recorded: dict) -> None:
    """Delete the recorded files that still hold their recorded bytes, then the folders they leave empty."""
    dirs = set()
    for rel, record in recorded.items():
        path = os.path.join(folder, rel)
        if _inside(path, folder) and matches(path, record):
            os.remove(path)
            dirs.add(os.path.dirname(path))
    for d in sorted(dirs, key=len, reverse=True):
        while _inside(d, folder) and os.path.realpath(d) != os.path.realpath(folder):
            with contextlib.suppress(OSError):
                os.rmdir(d)
            d = os.path.dirname(d)


def _inside(path: str, folder: str) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real == top or real.startswith(top + os.sep)


def write_manifest(folder: str, written_by: str) -> None:
    """Record every file of a folder qmilora is about to publish (called on its temporary, before the rename)."""
    record = {"written_by": written_by, "files": manifest(folder, skip=(MARKER, MANIFEST))}
    with open_new(os.path.join(folder, MANIFEST)) as f:
        f.write(json.dumps(record, indent=2).encode())


def check_replaceable(output: str, flag: str = "--overwrite") -> None:
    """An existing, non-empty output folder may be replaced only when it holds exactly what qmilora wrote there."""
    problem = _replace_problem(output, output, flag)
    if problem:
        raise QMiLoRAError(problem)


def _replace_problem(path: str, shown: str, flag: str) -> str | None:
    """Why the folder at `path` (named `shown` to the user) may not be replaced, or None."""
    if os.path.islink(path):
        return f"output {shown} is a symlink; write to a real folder"
    if os.path.lexists(path) and not os.path.isdir(path):
        return f"output {shown} is a file, not a directory"
    if not os.path.isdir(path) or not os.listdir(path):
        return None
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            recorded = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return (f"output {shown} is not empty and was not written by qmilora; choose a new or empty folder (qmilora "
                "replaces only its own outputs)")
    others = foreign(path, recorded, skip=(MANIFEST,))
    if others:
        return (f"output {shown} holds {', '.join(others[:3])}, which qmilora did not write (or which changed "
                f"since); move it away first: {flag} replaces only qmilora's own files")
    return None


# --- outputs against inputs ----------------------------------------------------------------------------------------------
def check_disjoint(output: str, inputs: dict[str, str | None], flag: str = "--output") -> None:
    """Refuse an output that is, contains, or lies inside an input (paths compared with symlinks resolved), before
    any work: replacing it would delete the input."""
    out = os.path.realpath(output)
    for what, path in inputs.items():
        if not path or not os.path.exists(path):
            continue
        src = os.path.realpath(path)
        if out == src:
            raise QMiLoRAError(f"{flag} {output} is {what}; write the output elsewhere")
        if src.startswith(out.rstrip(os.sep) + os.sep):
            raise QMiLoRAError(f"{flag} {output} contains {what} ({path}); write the output elsewhere")
        if out.startswith(src.rstrip(os.sep) + os.sep):
            raise QMiLoRAError(f"{flag} {output} lies inside {what} ({path}); write the output elsewhere")
