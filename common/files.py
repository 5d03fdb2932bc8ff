"""Files written so that an interrupted run never leaves a half-written output behind; where caches live."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

PARTIAL_SUFFIX = ".partial"
# The images every script reads (training data, class images, ZipLoRA examples): what PIL opens without plugins.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; it replaces `path` only when the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, is_main_process: bool | None = None):
    """Yield an empty temporary folder beside `path` to write into; it replaces `path` (and whatever was
    there) only when the block finishes without error, so a reader never finds half a folder.

    One process (is_main_process None) gets a folder of its own. In a distributed run every process passes
    whether it is the main one and all get the same folder: only the main process empties it beforehand
    and renames it afterwards, and the caller puts the barriers inside the block."""
    path = Path(path)
    if is_main_process is None:
        temporary = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    else:
        temporary = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    if is_main_process is False:
        yield temporary
        return
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        yield temporary
        if path.exists():
            shutil.rmtree(path)
        os.replace(temporary, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def remove_leftover_partials(folder: Path, pattern: str) -> None:
    """Delete the temporary files of atomic_path that a killed process left in the folders matching
    `pattern` under `folder`. Only safe while no live process writes there."""
    for partial in Path(folder).glob(f"{pattern}/.*{PARTIAL_SUFFIX}"):
        partial.unlink(missing_ok=True)


def user_umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def make_readable(root: str | os.PathLike) -> None:
    """Give a folder tree the permissions the user's umask gives an ordinary new file and folder: mkdtemp makes
    0700 folders and files written through temporary files can be 0600, which another user (a UI running as a
    service account, a shared model cache) cannot read."""
    mask = user_umask()
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


CACHE_ENV = "SDXL_PERSONALIZE_CACHE"


def cache_root() -> Path:
    """The toolkit's cache folder: $SDXL_PERSONALIZE_CACHE, else ~/.cache/sdxl_personalize."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sdxl_personalize")
