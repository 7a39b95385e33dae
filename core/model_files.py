"""The files of a saved model: tensors as safetensors (no pickle: reading one runs no code) and a SHA-256
manifest, so a folder that was modified, half-copied or mixed with another model's files is refused by
name before anything is built from it.

A folder is written whole or not at all (``write_folder``: into a temporary sibling, then renamed into
place), so an interrupted save never leaves a half-new model next to the old one's files.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from importlib import metadata as package_metadata
from pathlib import Path

import torch

from core.io import (
    FileSizeError,
    NotRegularFileError,
    atomic_write,
    file_sha256,
    open_regular,
    read_record_text,
    replace_folder,
    stream_sha256,
    write_json_atomic,
)

MANIFEST = "manifest.json"
_REFIT = "re-copy the whole folder from where it was saved, or refit it"


class ModelFilesError(ValueError):
    """A saved model's files do not match its manifest (or cannot be read); the message names the file."""


def versions() -> dict[str, str]:
    """The versions a model was saved with (recorded in ``model.json``; not checked on load)."""
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("torchvision", "safetensors", "patchcore-suite"):
        try:
            found[package] = package_metadata.version(package)
        except package_metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


# --------------------------------------------------------------------------- tensors


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """``tensors`` as a safetensors file, atomically. Copies break shared storage (tied weights), which
    safetensors refuses; a strict ``load_state_dict`` fills both names again."""
    from safetensors.torch import save_file

    plain = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(plain, str(tmp)))


def read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; ``ModelFilesError`` naming ``path`` when it is missing or not one."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise ModelFilesError(f"{what} {path} is missing or empty")
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises several types for truncated or foreign files
        first_line = str(error).splitlines()[0] if str(error) else "truncated?"
        raise ModelFilesError(f"{what} {path} cannot be read as a safetensors file ({type(error).__name__}: "
                              f"{first_line}); no code in it was run") from None


def read_bank(path: Path) -> torch.Tensor:
    """A saved bank's ``features``: a finite, non-empty [M, D] float tensor, or ``ModelFilesError``."""
    features = read_tensors(path, "memory bank").get("features")
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or len(features) == 0 \
            or not features.is_floating_point():
        raise ModelFilesError(f"memory bank {path} holds no non-empty [M, D] float tensor under 'features'")
    if not bool(torch.isfinite(features).all()):
        bad = int((~torch.isfinite(features)).any(dim=1).sum())
        raise ModelFilesError(f"memory bank {path} has {bad} rows with NaN or infinite values")
    return features


# --------------------------------------------------------------------------- manifest


def write_manifest(directory: Path) -> Path:
    """``manifest.json``: the SHA-256 and the size of every other file in ``directory`` (a saved model's or an
    export's folder). The sizes let a load refuse a wrong file before hashing it (manifests written before
    they were recorded are still read: ``sizes`` is optional)."""
    directory = Path(directory)
    paths = [path for path in sorted(directory.iterdir()) if path.name != MANIFEST]
    return write_json_atomic(directory / MANIFEST, {"algorithm": "sha256",
                                                    "files": {path.name: file_sha256(path) for path in paths},
                                                    "sizes": {path.name: path.stat().st_size for path in paths}})


def _plain_name(name) -> bool:
    return isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")


def _read_manifest(directory: Path) -> tuple[dict[str, str], dict[str, int] | None]:
    """The manifest's ``{name: digest}`` and ``{name: size}`` (None in a manifest without sizes), or
    ``ModelFilesError``: absent, not a regular file, or not of the manifest's form."""
    manifest_file = directory / MANIFEST
    if not manifest_file.exists() and not manifest_file.is_symlink():
        raise ModelFilesError(f"{directory} has no {MANIFEST}: it is not a complete saved model (an interrupted "
                              f"copy?); {_REFIT}")
    try:
        manifest = json.loads(read_record_text(manifest_file))
        files, sizes = manifest["files"], manifest.get("sizes")
        valid = manifest.get("algorithm") == "sha256" and isinstance(files, dict) and files and all(
            _plain_name(name) and isinstance(digest, str) for name, digest in files.items())
        valid = valid and (sizes is None or (isinstance(sizes, dict) and set(sizes) == set(files) and all(
            isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in sizes.values())))
    except (NotRegularFileError, FileSizeError) as error:
        raise ModelFilesError(f"{error}: a manifest is a plain file inside the folder; {_REFIT}") from None
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        valid = False
    if not valid:
        raise ModelFilesError(f"{manifest_file} is not a valid manifest (an object {{\"algorithm\": \"sha256\", "
                              f"\"files\": {{name: digest}}, \"sizes\": {{name: bytes}}}}); {_REFIT}")
    return files, sizes


def verify_manifest(directory: Path, first: tuple[str, ...] = (), check: Callable[[], None] | None = None) -> None:
    """Refuse a folder whose files are not exactly those of its manifest, with the same SHA-256: the message
    names the first file that is missing, not part of the model, not a regular file inside the folder (a
    symbolic link, a FIFO, a device, a folder: refused before anything is read from it, so a load can neither
    hang nor read outside the folder), of another size than recorded, or modified, and the fix.

    The cheap checks come first, for every file; then the files of ``first`` are hashed (a record, small),
    then ``check()`` runs (the record's own checks, before the large files are hashed), then the rest."""
    directory = Path(directory)
    files, sizes = _read_manifest(directory)
    present = {path.name for path in directory.iterdir()} - {MANIFEST}
    for name in sorted(set(files) - present):
        raise ModelFilesError(f"{directory / name} is missing (it is listed in {MANIFEST}); {_REFIT}")
    for name in sorted(present - set(files)):
        raise ModelFilesError(f"{directory / name} is not part of the saved model (not listed in {MANIFEST}): "
                              f"remove it, or {_REFIT}")
    for name in sorted(files):  # before any hashing: type and size of every file
        _open_listed(directory / name, None if sizes is None else sizes[name]).close()
    leading = [name for name in first if name in files]
    for name in leading:
        _check_digest(directory / name, files[name], None if sizes is None else sizes[name])
    if check is not None:
        check()
    for name in sorted(set(files) - set(leading)):
        _check_digest(directory / name, files[name], None if sizes is None else sizes[name])


def _check_digest(path: Path, expected: str, size: int | None) -> None:
    with _open_listed(path, size) as handle:
        digest = stream_sha256(handle)
    if digest != expected:
        raise ModelFilesError(f"{path} was modified after the model was saved (SHA-256 {digest[:12]}..., the "
                              f"manifest says {expected[:12]}...); {_REFIT}")


def _open_listed(path: Path, size: int | None):
    """A file listed in the manifest, opened if it is a regular file of the recorded size."""
    try:
        return open_regular(path, size)
    except NotRegularFileError as error:
        raise ModelFilesError(f"{error}: a saved model's files are plain files inside its folder; "
                              f"{_REFIT}") from None
    except FileSizeError:  # before hashing it: a truncated or replaced file
        raise ModelFilesError(f"{path} was modified after the model was saved ({path.stat().st_size} bytes, the "
                              f"{MANIFEST} says {size}); {_REFIT}") from None


# --------------------------------------------------------------------------- the folder, whole or not at all


def write_folder(directory: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_folder)``, add the manifest, then move the folder to ``directory``, replacing an
    earlier saved model only once the new one is complete (an interrupted save leaves the old folder, or none)."""
    directory = Path(directory)
    if directory.exists() and not (directory.is_dir() and (not any(directory.iterdir())
                                                           or (directory / "model.json").is_file())):
        raise ModelFilesError(f"{directory} exists and is not a saved model (no model.json): saving there would "
                              f"replace its files; choose another folder")
    return write_sealed_folder(directory, write)


def write_sealed_folder(directory: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a temporary sibling of ``directory``, add the manifest, swap it into place
    (``core.io.replace_folder``: an earlier folder is replaced only once the new one is complete; on any error
    nothing is left behind). Saved models and exports are both written this way; each caller checks first
    what it may replace."""
    def sealed(tmp: Path) -> None:
        write(tmp)
        write_manifest(tmp)

    return replace_folder(directory, sealed)
