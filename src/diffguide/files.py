"""Writing files without ever losing one.

- ``atomic_write``: a temporary file of this process in the same folder, flushed to disk, then
  renamed over the target (the old file stays until then); for files a run itself rotates
  (checkpoints, its own config and logs).
- ``write_file``: the same, but the finished file takes its name only if no file has it, unless
  ``overwrite``; missing folders are made, and removed again if the write fails while they are
  empty.
- ``check_new_file``: the checks a file output gets before any work (not a folder, not a dangling
  link, a name and a path the system takes, new unless ``overwrite``, a folder that can be written).
- ``replace_model_files``: a model folder written aside moved into an existing one file by file;
  nothing but the old model's own files is ever removed.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import tempfile
from typing import Callable

NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits, used where os.pathconf cannot say


def atomic_write(path: str, write: Callable, text: bool = False) -> None:
    """Call ``write(f)`` on a temporary file beside ``path`` and rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    # the name kept short: a temporary name longer than the target's would fail on a name near the
    # limit
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)[:64]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w" if text else "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a plain file is expected
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), text=True)


def write_json(path: str, obj) -> None:
    """``obj`` as indented JSON, written aside and renamed into place."""
    atomic_text(path, json.dumps(obj, indent=1))


def trim_log(path: str, step: int) -> None:
    """Keep the JSON lines of a training log with "step" <= ``step`` (resuming from a checkpoint
    at ``step`` writes the later ones again; a line a kill cut short is dropped). No file: no-op."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut short by the kill
                continue
            if isinstance(rec, dict) and rec.get("step", step + 1) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    atomic_text(path, "".join(keep))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file(path: str, write: Callable, overwrite: bool = False, text: bool = False) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then give it the name: exclusively
    (ValueError if a file has it meanwhile) unless ``overwrite``, which renames over it."""
    made = make_folders(os.path.dirname(os.path.abspath(path)))
    try:
        fd, tmp = tempfile.mkstemp(
            dir=os.path.dirname(os.path.abspath(path)), prefix=".diffguide-", suffix=".tmp"
        )
        try:
            with os.fdopen(fd, "w" if text else "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    link_exclusive(tmp, path)
                except FileExistsError:
                    raise ValueError(
                        f"output {path!r} appeared while this run was working; kept it (pass "
                        f"--overwrite to replace it)"
                    ) from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except BaseException:
        remove_empty(made)
        raise


def write_text(path: str, text: str, overwrite: bool = False) -> None:
    write_file(path, lambda f: f.write(text), overwrite, text=True)


def link_exclusive(tmp: str, target: str) -> None:
    """Give a finished file its name only if no file has it (hard link; where a file system has no
    links, an exclusive placeholder that the finished file then replaces). FileExistsError if
    taken."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.replace(tmp, target)


def make_folders(folder: str) -> list[str]:
    """Make a folder and its missing parents; returns those made, outermost first."""
    made, probe = [], os.path.abspath(folder)
    while not os.path.lexists(probe):
        made.append(probe)
        probe = os.path.dirname(probe)
    for path in reversed(made):
        try:
            os.mkdir(path)
        except FileExistsError:  # another run made it meanwhile: not ours to remove
            made.remove(path)
    return made[::-1]


def remove_empty(folders: list[str]) -> None:
    """Remove folders this run made, innermost first, where they are still empty (os.rmdir cannot
    remove a folder with anything in it)."""
    for path in reversed(folders):
        try:
            os.rmdir(path)
        except OSError:
            pass


def existing_parent(path: str) -> str:
    """The deepest folder on the way to ``path`` that exists (``path`` itself if it does)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return probe


def check_path(path: str, what: str = "output") -> None:
    """A path the system takes: every name within its name limit (255 bytes on most file systems)
    and the whole within its path limit (4096), as os.pathconf reports them for the nearest existing
    folder."""
    full = os.path.abspath(path)
    base = existing_parent(os.path.dirname(full))
    name_max, path_max = (
        _limit(base, "PC_NAME_MAX", NAME_MAX),
        _limit(base, "PC_PATH_MAX", PATH_MAX),
    )
    for name in full.split(os.sep):
        if len(os.fsencode(name)) > name_max:
            raise ValueError(
                f"{what} {shown(path)} has a name of {len(os.fsencode(name))} bytes "
                f"({shown(name)}); this file system allows at most {name_max}"
            )
    if len(os.fsencode(full)) >= path_max:  # PATH_MAX counts the terminating null byte
        raise ValueError(
            f"{what} {shown(path)} is {len(os.fsencode(full))} bytes long as a full path; this "
            f"system allows at most {path_max - 1}"
        )


def shown(path: str) -> str:
    """A path for a one-line message: quoted, its middle left out when it is long."""
    return repr(path if len(path) <= 100 else f"{path[:60]}...{path[-30:]}")


def _limit(folder: str, name: str, default: int) -> int:
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError):
        return default


def check_link(path: str, what: str = "output") -> None:
    """A dangling symbolic link is refused by name: writing through it or over it is never what was
    meant."""
    if os.path.islink(path) and not os.path.exists(path):
        raise ValueError(
            f"{what} {path!r} is a symbolic link to {os.readlink(path)!r}, which does not exist; "
            f"remove the link or give another path"
        )


def check_new_file(path: str, overwrite: bool, what: str = "output") -> None:
    """The checks a file output gets before any work: a path the system takes, not a dangling link,
    not a folder, new unless ``overwrite``, and a folder (or the nearest existing parent) that can
    be written."""
    if not path.strip():
        raise ValueError(f"{what} path is empty; give a file")
    check_path(path, what)
    check_link(path, what)
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a folder; give a file path")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{what} {path!r} exists; pass --overwrite to replace it")
    prove_writable(os.path.dirname(os.path.abspath(path)), what)


def prove_writable(folder: str, what: str = "output") -> None:
    """Create and remove a temporary file in the folder, or in its deepest existing parent when it
    does not exist yet: a path that cannot be written fails here, before any work, and leaves
    nothing behind."""
    probe = os.path.abspath(folder)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if os.path.islink(probe) and not os.path.exists(probe):
        raise ValueError(
            f"cannot write to {what} folder {folder!r}: {probe!r} is a symbolic link to "
            f"{os.readlink(probe)!r}, which does not exist"
        )
    if not os.path.isdir(probe):
        raise ValueError(f"cannot write to {what} folder {folder!r}: {probe!r} is a file")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".diffguide-probe-")
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise ValueError(f"cannot write to {what} folder {folder!r}: {e.strerror or e}") from None


def check_space(folder: str, needed: int, hint: str) -> None:
    """Refuse a run whose files (``needed`` bytes, an upper estimate) do not fit the free space of
    the file system that holds ``folder``."""
    free = shutil.disk_usage(existing_parent(folder)).free
    if needed > free:
        raise ValueError(
            f"the images asked need up to {_size(needed)} and {existing_parent(folder)!r} has "
            f"{_size(free)} free; {hint}"
        )


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


# -- model folders ---------------------------------------------------------------------------------

# the names diffusers and transformers save in a component folder (weights, configs, tokenizer
# files): what counts as an old model's own files when a model is written over it
MODEL_FILE_NAMES = (
    "config.json",
    "*_config.json",
    "*.safetensors",
    "*.bin",
    "*.index.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "chat_template.jinja",
)
MODEL_TOP_FILES = (
    "model_index.json",
    "diffguide.json",
)  # diffguide.json: a distilled student's defaults


def is_model_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "model_index.json"))


def model_files(folder: str) -> list[str]:
    """The model's own files in a diffusers folder, relative to it: model_index.json, diffguide.json
    and, in each component folder model_index.json names, the files diffusers and transformers
    save."""
    try:
        with open(os.path.join(folder, "model_index.json")) as f:
            index = json.load(f)
    except (OSError, ValueError):
        index = {}
    own = [name for name in MODEL_TOP_FILES if os.path.isfile(os.path.join(folder, name))]
    for component, value in index.items() if isinstance(index, dict) else ():
        sub = os.path.join(folder, component)
        if (
            not (isinstance(value, list) and value and value[-1])
            or not os.path.isdir(sub)
            or os.path.islink(sub)
        ):
            continue
        for name in sorted(os.listdir(sub)):
            if os.path.isfile(os.path.join(sub, name)) and any(
                fnmatch.fnmatch(name, p) for p in MODEL_FILE_NAMES
            ):
                own.append(os.path.join(component, name))
    return own


def replace_model_files(source: str, target: str) -> None:
    """Move the model written in ``source`` into the model folder ``target`` one file at a time
    (each
    renamed over its name), model_index.json last; then remove the old model's own files the new
    model did not write (``model_files``) and its component folders that this leaves empty. Nothing
    else in ``target`` is touched; ``source`` is left empty."""
    new = sorted(_files_under(source), key=lambda rel: rel in MODEL_TOP_FILES)
    old = set(model_files(target))
    for rel in new:  # a folder where a file goes (or the reverse) is found before anything moves
        dest = os.path.join(target, rel)
        if os.path.isdir(dest) or any(os.path.isfile(p) for p in _parents(target, rel)):
            raise ValueError(
                f"cannot write the model into {target!r}: {dest!r} is in the way (a folder where a "
                f"file goes, or a file where a folder goes)"
            )
    for rel in new:
        os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
        os.replace(os.path.join(source, rel), os.path.join(target, rel))
    for rel in sorted(old - set(new)):
        os.remove(os.path.join(target, rel))
    for folder in sorted({os.path.dirname(rel) for rel in old - set(new)} - {""}):
        try:
            os.rmdir(
                os.path.join(target, folder)
            )  # only when empty: a file of anyone else keeps it
        except OSError:
            pass


def save_model(pipe, folder: str, json_files: dict | None = None) -> str:
    """``pipe.save_pretrained`` into ``folder``.tmp with ``json_files`` (name: object) beside it,
    then renamed into place, or its files moved over an existing folder's model by name
    (``replace_model_files``: nothing else in the folder is touched)."""
    tmp = folder.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for name, obj in (json_files or {}).items():
        write_json(os.path.join(tmp, name), obj)
    if os.path.isdir(folder):
        replace_model_files(tmp, folder)
        shutil.rmtree(tmp)  # this save's own temporary folder, empty by now
    else:
        os.replace(tmp, folder)
    return folder


def _files_under(folder: str) -> list[str]:
    return [
        os.path.relpath(os.path.join(root, name), folder)
        for root, _, names in os.walk(folder)
        for name in names
    ]


def _parents(target: str, rel: str) -> list[str]:
    parts = rel.split(os.sep)[:-1]
    return [os.path.join(target, *parts[: i + 1]) for i in range(len(parts))]
