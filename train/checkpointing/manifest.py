"""A checkpoint unit's manifest (`unit.json`): what it lists is the unit, and the proof that leanfit wrote it.

The manifest records each file's size and SHA-256. `verify_unit` checks every listed file: a regular file (no
symlink anywhere on its path), inside the unit (no `..`, no absolute path), of that size and hash.
`remove_listed` deletes only what a manifest lists (or a whole unpublished folder that still carries the
partial marker, which leanfit made empty), so a file leanfit did not write is never removed.
"""

import hashlib
import json
import shutil
from pathlib import Path

__all__ = ["MANIFEST", "SCHEMA", "SCHEMAS", "PARTIAL", "UnitError", "sha256", "read_manifest", "inside",
           "verify_unit", "is_unit_folder", "remove_listed"]

MANIFEST = "unit.json"
SCHEMA = "leanfit.checkpoint/2"
SCHEMAS = ("leanfit.checkpoint/1", SCHEMA)  # /1 recorded sizes only
PARTIAL = ".leanfit-partial"  # in an unpublished unit folder until its manifest is written
_VERIFIED = set()  # (file, size, mtime, inode, sha256) hashed by this process: a resume verifies once, not thrice


class UnitError(ValueError):
    """No complete unit to resume from, or a unit whose parts disagree."""


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(unit: Path) -> dict:
    try:
        manifest = json.loads((unit / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnitError(f"{unit / MANIFEST} is missing or unreadable ({type(e).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") not in SCHEMAS \
            or not isinstance(manifest.get("files"), dict):
        raise UnitError(f"{unit / MANIFEST} is not a leanfit manifest")
    return manifest


def inside(unit: Path, name: str) -> Path:
    """`unit / name` when `name` stays inside the unit and no part of it is a symlink; else UnitError."""
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise UnitError(f"{unit / MANIFEST} lists {name!r}, a path outside the unit")
    for i in range(1, len(parts) + 1):
        if (unit.joinpath(*parts[:i])).is_symlink():
            raise UnitError(f"{unit.joinpath(*parts[:i])} is a symlink (a unit holds only its own files)")
    return unit / name


def _check_file(unit: Path, name: str, entry) -> None:
    path = inside(unit, name)
    size, digest = (entry, None) if isinstance(entry, int) else (entry.get("size"), entry.get("sha256")) \
        if isinstance(entry, dict) else (None, None)
    if not path.is_file() or path.stat().st_size != size:
        raise UnitError(f"{path} is missing or truncated (expected {size} bytes)")
    if digest is not None:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, digest)
        if key not in _VERIFIED and sha256(path) != digest:
            raise UnitError(f"{path} does not match its SHA-256 in {MANIFEST} (damaged)")
        _VERIFIED.add(key)


def verify_unit(unit) -> dict:
    """The manifest of the unit folder `unit` after checking every file it lists; UnitError naming what is wrong."""
    unit = Path(unit)
    if unit.is_symlink():
        raise UnitError(f"{unit} is a symlink (expected a unit folder)")
    manifest = read_manifest(unit)
    if MANIFEST in manifest["files"]:
        raise UnitError(f"{unit / MANIFEST} lists itself")
    for name, entry in manifest["files"].items():
        _check_file(unit, name, entry)
    return manifest


def is_unit_folder(folder) -> bool:
    """Whether `folder` carries a leanfit unit manifest (verified or not): proof that leanfit wrote it."""
    try:
        read_manifest(Path(folder))
    except UnitError:
        return False
    return not Path(folder).is_symlink()


def remove_listed(unit: Path) -> list[str]:
    """Removes the files a leanfit unit folder's manifest lists (and the marker, the manifest), then each folder
    left empty; a file it does not list stays. An unpublished folder that still carries the partial marker was
    made empty by this save, so all of it goes. Returns what stayed."""
    if (unit / PARTIAL).is_file() and not unit.is_symlink():
        shutil.rmtree(unit)
        return []
    try:
        names = list(read_manifest(unit)["files"])
    except UnitError:
        names = []
    for name in [*names, MANIFEST, PARTIAL]:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts \
                or any(unit.joinpath(*parts[:i]).is_symlink() for i in range(1, len(parts))):
            continue
        path = unit / name
        if path.is_symlink() or path.is_file():
            path.unlink()
    for folder in sorted((p for p in unit.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    left = sorted(p.relative_to(unit).as_posix() for p in unit.rglob("*"))
    if not left:
        unit.rmdir()
    return left
