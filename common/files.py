"""Files written so that an interrupted run never leaves a half-written output behind; where caches live."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

PARTIAL_SUFFIX = ".partial"
LARGE_FILE_BYTES = 2**30  # an output above this is announced, with what makes it smaller, before it is written
# The images every script reads (training data, class images, ZipLoRA examples): what PIL opens without plugins.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})


def has_images(folder: Path) -> bool:
    """Whether `folder` itself (not its subfolders) holds a file of an image suffix."""
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; it replaces `path` only when the block finishes without error,
    with the permissions the user's umask gives a new file (safetensors writes 0600 files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        yield temporary
        make_readable(temporary)
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
        make_readable(temporary)
        if path.exists():
            shutil.rmtree(path)
        os.replace(temporary, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def remove_leftover_partials(folder: Path, pattern: str = "") -> None:
    """Delete the temporary files of atomic_path that killed processes left in `folder` (or in its folders
    matching `pattern`); a file whose writer (the pid in its name) still runs on this machine is kept."""
    for partial in Path(folder).glob(f"{pattern}/.*{PARTIAL_SUFFIX}" if pattern else f".*{PARTIAL_SUFFIX}"):
        writer = partial.name.removesuffix(PARTIAL_SUFFIX).rpartition(".")[2]
        if not (writer.isdigit() and process_is_alive(int(writer))):
            partial.unlink(missing_ok=True)


def process_is_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def writable_folder(path: str | os.PathLike, option: str) -> Path:
    """`path` as a folder this process can write into, made if missing; checked before any work starts, so a
    wrong path costs seconds, not a run. Refused in one line naming the option and the path."""
    from common.cli import UserError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {str(path)!r} is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{option} {str(path)!r} cannot be written: {error.strerror or error}") from None
    return check_writable_folder(path, option)


def check_writable_folder(path: str | os.PathLike, option: str) -> Path:
    """`path` would be a folder this process can write into, checked without making it (a refused run leaves the
    file system as it found it): an existing folder by writing a temporary file in it, a missing one by making and
    removing a temporary folder in its nearest existing parent."""
    import tempfile

    from common.cli import UserError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {str(path)!r} is a file; give a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {str(path)!r} cannot be made: {str(existing)!r} is a file")
    try:
        if existing == path:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
        else:
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".write-test-"))
    except OSError as error:
        raise UserError(f"{option} {str(path)!r} cannot be written: {error.strerror or error}") from None
    return path


# the byte-order marks of the encodings a text file may come in (UTF-32 first: its LE mark starts like UTF-16's)
TEXT_ENCODINGS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xef\xbb\xbf", "utf-8-sig"),
                  (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def read_text_file(path: str | os.PathLike, what: str) -> str:
    """A text file written by any common editor: UTF-8 with or without a byte-order mark, UTF-16 or UTF-32 with one
    (Windows' Notepad "Unicode"); the mark never reaches the text. Anything else is refused in one line naming the
    file, the byte offset and the byte (a latin-1 or cp1252 file, a binary file)."""
    from common.cli import UserError

    data = Path(path).read_bytes()
    encoding = next((name for mark, name in TEXT_ENCODINGS if data.startswith(mark)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        raise UserError(f"{what} {str(path)!r} is not {encoding.upper().removesuffix('-SIG')} text: byte 0x{data[error.start]:02x} at "
                        f"offset {error.start} (save it as UTF-8)") from None
    if "\x00" in text:  # UTF-16 without its byte-order mark decodes as "UTF-8" with a NUL between letters
        offset = data.index(b"\x00")
        raise UserError(f"{what} {str(path)!r} is not text: byte 0x00 at offset {offset} (UTF-16 without a byte-order mark? "
                        "save it as UTF-8)")
    return text


def writable_file(path: str | os.PathLike, option: str) -> Path:
    """`path` as a file this process can create or replace: not a folder, in a writable folder."""
    from common.cli import UserError

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {str(path)!r} is a folder; give a file name")
    writable_folder(path.parent, f"the folder of {option}")
    return path


def claim_free_name(finished: Path, name_for, first: int) -> Path:
    """Give the finished file `finished` the first name `name_for(n)`, n >= first, that no file has yet.
    The name is claimed atomically (a hard link fails where the name exists), so processes saving into one
    folder at once never replace each other's files; `finished` itself is left for the caller to remove."""
    number = first
    while True:
        target = name_for(number)
        try:
            os.link(finished, target)
            return target
        except FileExistsError:
            number += 1


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


class FolderLock:
    """An exclusive flock on a folder itself (no lock file is left in it); released by `close`, when the object
    is collected, or by the kernel when the process ends, however it ends."""

    def __init__(self, folder: Path, option: str):
        import fcntl

        from common.cli import UserError

        self.descriptor = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(self.descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise UserError(f"{option} {str(folder)!r} is in use by another run; wait for it to end or choose another "
                            "folder") from None

    def close(self) -> None:
        if self.descriptor is not None:
            os.close(self.descriptor)
            self.descriptor = None

    __del__ = close


def lock_folder(folder: str | os.PathLike, option: str) -> FolderLock:
    """Hold an exclusive lock on `folder` while the returned lock lives; a second run is refused in one line."""
    return FolderLock(Path(folder), option)


def parse_toml(text: str, source: str, alternative: str = "") -> dict:
    """A TOML document (`source` names it in the refusal, `alternative` says what else would do): Python 3.11's tomllib,
    or the tomli package on 3.10."""
    from common.cli import UserError

    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise UserError(f"{source}: reading TOML needs Python 3.11+ or the tomli package (pip install tomli){alternative}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        hint = ""
        if "\\" in text and ("escape" in str(error).lower() or "'\\'" in str(error) or "hex" in str(error).lower()):
            hint = "; a Windows path in double quotes? write it in single quotes: image_dir = 'C:\\images'"
        raise UserError(f"{source} is not TOML: {error}{hint}") from None
