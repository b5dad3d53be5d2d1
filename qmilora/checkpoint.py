"""Checkpoint files: locate a safetensors checkpoint and validate its headers, identify it by its content, and write
files and directories atomically (temporary name, then rename). Loading the tensors is transformers' job."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import json
import os
import shutil
import struct
import threading

from . import files
from .config import QMiLoRAError
from .files import atomic_dir, default_dir_mode, remove_stale_temporaries, write_atomic  # noqa: F401 (re-exported)

# Tensor-name suffixes that quantized checkpoints carry beside (or instead of) a float `weight`:
# bitsandbytes (absmax, quant_map, quant_state, SCB), GPTQ/AWQ (qweight, qzeros, scales, g_idx).
QUANTIZED_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format",
                      ".qweight", ".qzeros", ".scales", ".g_idx")
# the files a tokenizer is saved as (transformers writes some of these per tokenizer type): what identifies a run's
# tokenizer, what an export copies, and what a run's final write may put into its folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "spiece.model")
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def resolve(source: str) -> str:
    """A local checkpoint directory for `source` (a directory, or a Hub id downloaded to the HF cache)."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise QMiLoRAError(f"{path} has no config.json: it is not a transformers checkpoint")
        return path
    if os.path.exists(path):
        raise QMiLoRAError(f"model {source!r} is a file; pass the checkpoint directory that holds config.json")
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.sep in path.replace("/", "")
    if looks_local:
        raise QMiLoRAError(f"model directory {source!r} does not exist")
    from huggingface_hub import constants, snapshot_download

    from .configs import _reachable

    try:  # already downloaded: no request at all
        return snapshot_download(source, allow_patterns=_HUB_FILES, local_files_only=True)
    except Exception:  # noqa: BLE001 - not (completely) in the Hugging Face cache
        pass
    if constants.HF_HUB_OFFLINE or not _reachable(constants.ENDPOINT):
        # the Hub client would retry for half a minute before failing the same way
        raise QMiLoRAError(f"model {source!r} is not a local directory nor in the Hugging Face cache, and the Hub "
                           "cannot be reached; download it first, or pass a checkpoint directory")
    try:
        return snapshot_download(source, allow_patterns=_HUB_FILES)
    except Exception as err:  # offline, unknown id, gated repo: all end the same way for the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise QMiLoRAError(f"model {source!r} is not a local directory and could not be fetched from the "
                           f"Hugging Face Hub ({type(err).__name__}: {reason})") from None


def shard_files(directory: str) -> list[str]:
    """The checkpoint's safetensors files, in index order."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(directory, n) for n in names]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise QMiLoRAError(f"{index} names shard {os.path.basename(missing[0])}, which is missing")
        return files
    files = sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not files:
        pickles = [n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth"))]
        hint = " (it has only pickle weights; convert them to safetensors first)" if pickles else ""
        raise QMiLoRAError(f"no .safetensors weights in {directory}{hint}")
    return files


def read_header(path: str) -> dict:
    """The safetensors JSON header (names, dtypes, shapes, offsets) without touching tensor data; a file that is
    empty, truncated or not safetensors is refused naming the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8)) if size >= 8 else (-1,)
            if not 0 < length <= size - 8:
                raise ValueError("no safetensors header")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a mapping")
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except OSError as err:
        raise QMiLoRAError(f"cannot read {path}: {err.strerror or err}") from None
    except (ValueError, KeyError, TypeError, IndexError, struct.error):
        raise QMiLoRAError(f"{path} is not a valid safetensors file (empty, truncated or corrupt header)") from None
    if 8 + length + max(ends, default=0) > size:
        raise QMiLoRAError(f"{path} is truncated: its header describes {8 + length + max(ends)} bytes, the file has {size}")
    return header


def tensor_dtypes(files: list[str]) -> dict[str, str]:
    """{tensor name: safetensors dtype code (F32, BF16, I8, ...)} of every shard, from the headers alone."""
    return {k: v["dtype"] for f in files for k, v in read_header(f).items() if k != "__metadata__"}


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op).

    Each weight's transient fp32 copies and SVD workspaces are freed between long-lived small allocations
    (the 4-bit weights, the factors); glibc keeps such fragmented heap memory, so RSS would climb by a
    layer's workspace per layer although nothing is live.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def peak_rss_gb() -> float:
    """This process's peak resident memory. VmHWM where Linux has it: ru_maxrss also counts the memory of the
    parent at fork time (it survives exec), which would charge a small child with a large parent's footprint."""
    try:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmHWM:")[1].split()[0]) / 2**20
    except (OSError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


_CHUNK = 8 << 20


def _stat_key(path: str, st: os.stat_result) -> str:
    return f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0{st.st_dev}"


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns, a.st_ctime_ns) == \
        (b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns, b.st_ctime_ns)


def _hash_open(path: str) -> tuple[str, os.stat_result, bool]:
    """(sha256, the stat of the bytes hashed, whether `path` still names those unchanged bytes afterwards).

    The stat comes from the open file, before reading: a file renamed into place or rewritten meanwhile (rsync and
    hub downloads rename) is detected by comparing it with the file's stat after the hash and the path's."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        after = os.fstat(f.fileno())
    try:
        now = os.stat(path)
    except OSError:
        return h.hexdigest(), before, False
    return h.hexdigest(), before, _same_file(before, after) and _same_file(before, now)


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (hashlib releases the GIL on each chunk, so this overlaps other work in a thread)."""
    return _hash_open(path)[0]


class DigestMemo:
    """File digests remembered by (real path, size, mtime, ctime, inode, device), so an unchanged file is hashed once.

    Any write to a file changes its mtime and ctime (ctime cannot be set back by a user), so a memo hit means the
    bytes are those that were hashed. A digest is remembered only under the stat its bytes had while they were read,
    and only when the file did not change during the read. One small JSON file per stat key under `directory`
    (inside the private cache); None disables the memo.
    """

    def __init__(self, directory: str | None):
        self.directory = directory

    def _memo_path(self, key: str) -> str:
        return os.path.join(self.directory, hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")

    def get(self, path: str) -> str | None:
        if self.directory is None:
            return None
        try:
            with open(self._memo_path(_stat_key(path, os.stat(path)))) as f:
                return json.load(f)["sha256"]
        except (TypeError, OSError, ValueError, KeyError):
            return None

    def put(self, path: str, digest: str, st: os.stat_result | None = None) -> None:
        """Remember `digest` for the file whose stat is `st` (default: the file at `path` now; pass the stat taken
        when the bytes were hashed whenever the file might have changed since)."""
        if self.directory is None:
            return
        try:
            key = _stat_key(path, st or os.stat(path))
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            write_atomic(self._memo_path(key), json.dumps({"path": os.path.realpath(path), "sha256": digest}).encode(),
                         private=True)
        except OSError:
            pass  # a memo is an optimization: an unwritable cache only costs a rehash next time

    def digest(self, path: str) -> str:
        found = self.get(path)
        if found is None:
            found, st, unchanged = _hash_open(path)
            if unchanged:
                self.put(path, found, st)
        return found


class SourceIdentity:
    """The content identity of a checkpoint: sha256 over config.json and every shard's full bytes.

    Any changed byte in any tensor gives another identity. Shards already hashed (same stat) come from the memo;
    the others can be hashed in a background thread while the caller streams the same files (`start`), so the
    first computation costs little wall time; `value()` waits for it.

    config.json's bytes and every shard's stat are taken when this is created (before the caller parses or streams
    them); `value()` refuses if any of them changed since, so an identity never names other bytes than those used.
    """

    def __init__(self, directory: str, files: list[str], memo: DigestMemo, parsed_config: bytes | None = None):
        self.directory, self.files, self.memo = directory, list(files), memo
        # the bytes the caller parsed, when it read them before this
        self.config_bytes = config_bytes(directory) if parsed_config is None else parsed_config
        self._stats = {f: _stat_or_none(f) for f in self.files}
        self._digests = {f: memo.get(f) for f in self.files}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def known(self) -> str | None:
        """The identity if every shard's digest is memoized, else None (nothing is read)."""
        return self._combine() if all(self._digests.values()) else None

    def start(self) -> "SourceIdentity":
        missing = [f for f, d in self._digests.items() if d is None]
        if missing and self._thread is None:
            self._thread = threading.Thread(target=self._hash, args=(missing,), daemon=True, name="qmilora-hash")
            self._thread.start()
        return self

    def _hash(self, files: list[str]) -> None:
        # shards hash in parallel (hashlib releases the GIL), leaving half the cores to the stream beside it
        from concurrent.futures import ThreadPoolExecutor

        workers = max(1, min(len(files), (os.cpu_count() or 2) // 2))
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="qmilora-hash") as pool:
                for f, digest in zip(files, pool.map(self.memo.digest, files)):
                    self._digests[f] = digest
        except BaseException as err:  # re-raised in value(), on the caller's thread
            self._error = err

    def value(self) -> str:
        self.start()
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise QMiLoRAError(f"could not read {self.directory} to identify it: {self._error}")
        self.check_unchanged()
        return self._combine()

    def check_unchanged(self) -> None:
        """Refuse when config.json or a shard changed since this identity was started (a download or copy still
        writing, or another program): the model built from it would not be the one the identity names."""
        if config_bytes(self.directory) != self.config_bytes:
            raise QMiLoRAError(f"{os.path.join(self.directory, 'config.json')} changed while the model was being "
                               "prepared; run again once nothing writes to the checkpoint")
        for path, st in self._stats.items():
            now = _stat_or_none(path)
            if st is None or now is None or not _same_file(st, now):
                raise QMiLoRAError(f"{path} changed while the model was being prepared (replaced or rewritten); run "
                                   "again once nothing writes to the checkpoint")

    def weak(self) -> str:
        """config.json and the shard headers only: equal for two checkpoints that may hold the same content."""
        h = hashlib.sha256(self.config_bytes)
        for path in self.files:
            h.update(os.path.basename(path).encode())
            h.update(json.dumps(read_header(path), sort_keys=True).encode())
        return h.hexdigest()

    def _combine(self) -> str:
        h = hashlib.sha256(self.config_bytes)
        for path in sorted(self.files, key=os.path.basename):
            h.update(os.path.basename(path).encode() + b"\0" + self._digests[path].encode())
        return h.hexdigest()


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def config_bytes(directory: str) -> bytes:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return b""
    with open(path, "rb") as f:
        return f.read()


def identity(directory: str, files: list[str], memo: DigestMemo) -> str:
    """The content identity of a checkpoint, computed now (memoized per unchanged shard)."""
    return SourceIdentity(directory, files, memo).value()


def refuse_quantized_config(config) -> None:
    qc = getattr(config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else getattr(qc, "quant_method", "unknown")
        raise QMiLoRAError(
            f"the checkpoint is already quantized ({method}): QMiLoRA needs full-precision weights, because the "
            "minor singular components of a quantized weight are mostly quantization noise; use the original model")


def refuse_quantized_tensors(dtypes: dict[str, str]) -> None:
    """Quantized checkpoints carry tell-tale tensors (absmax, qweight, ...) or integer weights."""
    hits = [n for n in dtypes if n.endswith(QUANTIZED_SUFFIXES) or ".quant_state." in n]
    if hits:
        raise QMiLoRAError(
            f"the checkpoint holds quantized tensors (e.g. {hits[0]}): QMiLoRA needs full-precision weights, because "
            "the minor singular components of a quantized weight are mostly quantization noise; use the original model")
    ints = [n for n, d in dtypes.items() if n.endswith(".weight") and not d.startswith(("F", "BF"))]
    if ints:
        raise QMiLoRAError(
            f"tensor {ints[0]} is {dtypes[ints[0]]}, not floating point: the checkpoint looks quantized, and QMiLoRA "
            "needs full-precision weights")


def fresh_output(path: str, overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuse to write `path` where that would replace or delete what is there: a non-empty folder needs `overwrite`
    and must hold only what qmilora wrote there."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise QMiLoRAError(f"output {path} is a file, not a directory")
    if os.path.realpath(path) in (os.path.realpath(os.getcwd()), os.sep):
        raise QMiLoRAError(f"output {path} is the current folder (or /); name a new folder for it")
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            raise QMiLoRAError(f"output {path} exists and is not empty; pass {flag} to replace it")
        files.check_replaceable(path, flag)
    check_writable(os.path.dirname(os.path.abspath(path)) or ".")


def check_writable(directory: str) -> None:
    """Fail now, not after an hour of SVDs, if `directory` (or its nearest existing parent) cannot be written."""
    probe = os.path.abspath(directory)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise QMiLoRAError(f"{directory}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise QMiLoRAError(f"{directory}: {probe} is not writable")


def check_free_space(directory: str, needed: int, what: str) -> None:
    """Refuse to start writing `needed` bytes where the file system has less free."""
    probe = os.path.abspath(directory)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise QMiLoRAError(f"not enough disk space for {what} in {probe}: needs {_size(needed)}, {_size(free)} free; "
                           "free some space or write elsewhere")


def _size(n: int) -> str:
    """Bytes as a person reads them (a small need never shows as 0.00 GB)."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"
