"""The prepared-model cache: the one owner of a cache entry's on-disk format.

    <cache_dir>/<key>/
        base/              transformers' 4-bit save of the residual model (reloads with from_pretrained)
        initial_adapter/   PEFT adapter holding the minor factors
        qmilora.json       written last: format, what the key covers, the preparation's statistics, and the size and
                           sha256 of every file above (an entry without it is not an entry)
    <cache_dir>/digests/   memoized file digests (`checkpoint.DigestMemo`)

The key covers the source checkpoint's content identity and every config field that changes the prepared tensors.
An entry is verified against its recorded sizes and digests before it is used (memoized per unchanged file, so a
rerun reads nothing twice); a damaged entry is removed and rebuilt.

The cache is private: its root is created 0700 and refused (one line) when another account owns it or may write
it, as are its entries, since whatever verifies there is loaded and trained on. Entries are written 0600.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

from . import checkpoint, files as qfiles

log = logging.getLogger("qmilora")
FORMAT = 2
BASE, ADAPTER, META = "base", "initial_adapter", "qmilora.json"


def open_root(path: str) -> str:
    """The cache folder, created private when missing; refused when another account owns or may write it."""
    return qfiles.private_dir(path, "the qmilora cache")


def memo(root: str) -> checkpoint.DigestMemo:
    digests = os.path.join(open_root(root), "digests")
    qfiles.check_private(digests, "the qmilora digest memo")
    return checkpoint.DigestMemo(digests)


def key(source_identity: str, recipe: dict) -> str:
    blob = {"format": FORMAT, "source": source_identity, "recipe": recipe}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]


def may_hold(root: str, weak_identity: str) -> bool:
    """Whether some entry was prepared from a checkpoint with these headers (only then is a full hash worth waiting
    for before preparing: otherwise there can be no hit, and the hash runs alongside the preparation)."""
    if not os.path.isdir(root):
        return False
    for name in os.listdir(root):
        meta = _read_meta(os.path.join(root, name))
        if meta and meta.get("source_weak") == weak_identity:
            return True
    return False


def _read_meta(path: str) -> dict | None:
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None
    except (OSError, ValueError):
        return None


class Entry:
    def __init__(self, root: str, key: str):
        self.root, self.key = root, key
        self.path = os.path.join(root, key)
        self.base = os.path.join(self.path, BASE)
        self.adapter = os.path.join(self.path, ADAPTER)

    def meta(self) -> dict | None:
        return _read_meta(self.path)

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def problem(self) -> str | None:
        """Why this entry cannot be used (missing, truncated or changed file), or None when it verifies."""
        qfiles.check_private(self.path, "the cache entry")
        meta = self.meta()
        if meta is None:
            return f"{META} is missing or unreadable"
        digests = memo(self.root)
        for rel, (size, digest) in meta.get("files", {}).items():
            path = os.path.join(self.path, rel)
            if not os.path.isfile(path) or os.path.islink(path):
                return f"{rel} is missing"
            if os.path.getsize(path) != size:
                return f"{rel} has {os.path.getsize(path)} bytes, {size} were written"
            if digests.digest(path) != digest:
                return f"{rel} does not match the checksum recorded when it was written"
        if not meta.get("files"):
            return "it records no files"
        return None

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def write(self, save, meta: dict, expected_bytes: int = 0) -> None:
        """`save(tmp_base, tmp_adapter)` writes the model files; then the manifest, then the atomic rename."""
        open_root(self.root)
        checkpoint.check_free_space(self.root, expected_bytes, "the prepared-model cache entry")
        with qfiles.atomic_dir(self.path, overwrite=True, private=True) as tmp:
            save(os.path.join(tmp, BASE), os.path.join(tmp, ADAPTER))
            written = qfiles.manifest(tmp, skip=(qfiles.MARKER,))
            with qfiles.open_new(os.path.join(tmp, META), 0o600) as f:
                f.write(json.dumps({**meta, "format": FORMAT, "files": written}, indent=2).encode())
        digests = memo(self.root)  # the files were just hashed: remember them under their final paths
        for rel, (_, digest) in written.items():
            digests.put(os.path.join(self.path, rel), digest)
