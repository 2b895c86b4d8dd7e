"""A bundle directory on disk: read the signed manifest, check the tree, stream-verify and decrypt files.

Every file is opened with O_NOFOLLOW and O_NONBLOCK and read at most to its declared size, so a link,
FIFO or device swapped in after the tree check, or a file that keeps growing, cannot make us read
anything undeclared or wait forever. Decrypted model files are written through a directory
descriptor the caller holds (a directory only root can enter), never through a path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.atomic import PARTIAL_SUFFIX, atomic_file
from appliance.errors import BundleError, DecryptError
from appliance.nofollow import open_file, why
from installer.bundle.manifest import MANIFEST, MAX_MANIFEST_BYTES, SIGNATURE, FileEntry, Manifest, ModelFile
from installer.bundle.stream import Readable, decrypt_stream
from installer.bundle.trust import SIGNATURE_SIZE, Policy, verify_manifest

READ_SIZE = 1 << 20
Progress = Callable[[str, int, int], None]


def _open(path: Path) -> Readable:
    """O_NOFOLLOW and O_NONBLOCK: a file swapped for a link, a FIFO or a device after the tree check is
    refused at once, never followed or waited on (a FIFO with no writer would block the open forever)."""
    try:
        fd = open_file(path)
    except FileNotFoundError:
        raise BundleError(f"{path.name} is missing from the bundle at {path.parent}.") from None
    except OSError as e:
        raise BundleError(f"Cannot open {path}: {why(e)}; only regular files are allowed in a bundle.") from None
    return os.fdopen(fd, "rb", buffering=0)


def read_bounded(path: Path, cap: int) -> bytes:
    """Read a whole small file, refusing one over `cap` bytes without reading past cap + 1."""
    with _open(path) as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise BundleError(f"{path.name} is larger than the {cap}-byte cap.")
    return data


def read_signed(bundle: Path) -> tuple[bytes, bytes]:
    """The raw manifest bytes and signature, each read under its cap."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"{bundle} is not a bundle directory.", "Point at the directory that holds manifest.json.")
    return read_bounded(bundle / MANIFEST, MAX_MANIFEST_BYTES), read_bounded(bundle / SIGNATURE, SIGNATURE_SIZE + 1024)


def load_manifest(bundle: Path, trusted: list[Ed25519PublicKey], policy: Policy) -> tuple[Manifest, Ed25519PublicKey]:
    return verify_manifest(*read_signed(bundle), trusted, policy)


def check_tree(bundle: Path, manifest: Manifest) -> None:
    """Everything on disk is listed, every listed file is there, and nothing is a link or device."""
    listed = {f.path for f in manifest.files} | {MANIFEST, SIGNATURE}
    dirs = {p.rsplit("/", i)[0] for p in listed for i in range(1, p.count("/") + 1)}
    found: set[str] = set()

    def walk(d: Path, rel: str) -> None:
        with os.scandir(d) as it:
            for e in it:
                r = f"{rel}{e.name}"
                st = e.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    if r not in dirs:
                        raise BundleError(f"The bundle holds a directory {r!r} that the manifest does not list.", "Remove it, or copy the bundle again.")
                    walk(Path(e.path), r + "/")
                elif stat.S_ISREG(st.st_mode):
                    if r not in listed:
                        raise BundleError(f"The bundle holds a file {r!r} that the manifest does not list.", "Remove it, or copy the bundle again.")
                    found.add(r)
                else:
                    kind = "symbolic link" if stat.S_ISLNK(st.st_mode) else "special file"
                    raise BundleError(f"The bundle holds {r!r}, a {kind}; only regular files are allowed.")

    walk(Path(bundle), "")
    missing = sorted(listed - found)
    if missing:
        raise BundleError(f"The bundle is missing {missing[0]!r}" + (f" and {len(missing) - 1} more files." if len(missing) > 1 else "."))


def _stream(f: Readable, entry: FileEntry, sink: Callable[[memoryview], object], progress: Progress | None) -> None:
    buf = bytearray(READ_SIZE)
    done = 0
    while done < entry.size:
        n = f.readinto(memoryview(buf)[: min(READ_SIZE, entry.size - done)])
        if not n:
            raise BundleError(f"{entry.path} is shorter than its declared {entry.size} bytes (ends at {done}).")
        sink(memoryview(buf)[:n])
        done += n
        if progress:
            progress(entry.path, done, entry.size)
    if f.read(1):
        raise BundleError(f"{entry.path} is longer than its declared {entry.size} bytes.")


def verify_file(bundle: Path, entry: FileEntry, progress: Progress | None = None) -> None:
    h = hashlib.sha256()
    with _open(Path(bundle) / entry.path) as f:
        _stream(f, entry, h.update, progress)
    if h.hexdigest() != entry.sha256:
        raise BundleError(f"{entry.path} does not match its SHA-256 in the manifest: the file was altered or damaged.")


def copy_verified(bundle: Path, entry: FileEntry, dest: Path) -> None:
    """Copy one listed file off the bundle, hashing exactly the bytes copied; `dest` appears only if they match."""
    h = hashlib.sha256()
    with _open(Path(bundle) / entry.path) as src, atomic_file(dest) as out:

        def sink(view: memoryview) -> None:
            h.update(view)
            out.write(view)

        _stream(src, entry, sink, None)
        if h.hexdigest() != entry.sha256:
            raise BundleError(f"{entry.path} does not match its SHA-256 in the manifest: the file was altered or damaged.")


def verify_bundle(
    bundle: Path, trusted: list[Ed25519PublicKey], policy: Policy,
    progress: Progress | None = None, skip: set[str] | None = None,
) -> tuple[Manifest, Ed25519PublicKey]:
    """Signature, policy, tree, then every file's length and SHA-256 (except those in `skip`)."""
    manifest, signer = load_manifest(bundle, trusted, policy)
    check_tree(bundle, manifest)
    for entry in manifest.files:
        if entry.path not in (skip or set()):
            verify_file(bundle, entry, progress)
    return manifest, signer


def decrypt_model_file(
    bundle: Path, manifest: Manifest, mf: ModelFile, data_key: bytes, dest: Path,
    progress: Progress | None = None, dir_fd: int | None = None,
) -> None:
    """Hash the ciphertext and decrypt it in one pass into `dest` (0600), relative to the directory
    `dir_fd` when given (as os functions take it); the file keeps a `.partial` name until both check
    out and it is fsynced."""
    if dir_fd is None:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        parent = os.open(Path(dest).parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return decrypt_model_file(bundle, manifest, mf, data_key, Path(Path(dest).name), progress, parent)
        finally:
            os.close(parent)
    entry = manifest.file(mf.path)
    h = hashlib.sha256()
    done = 0

    def observe(view: memoryview) -> None:
        nonlocal done
        h.update(view)
        done += len(view)
        if progress:
            progress(entry.path, done, entry.size)

    name, tmp = str(dest), f".{Path(dest).name}{PARTIAL_SUFFIX}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)  # a crashed run's
    fd = open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
    try:
        with _open(Path(bundle) / entry.path) as src, os.fdopen(fd, "wb") as out:
            size = decrypt_stream(src, entry.size, data_key, out.write, observe, what=entry.path)
            if h.hexdigest() != entry.sha256:
                raise BundleError(f"{entry.path} does not match its SHA-256 in the manifest: the file was altered or damaged.")
            if size != mf.plain_size:
                raise DecryptError(f"{entry.path} decrypted to {size} bytes, not the declared {mf.plain_size}.")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    return None
