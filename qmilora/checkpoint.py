"""Checkpoint files: locate a safetensors checkpoint and validate its headers, identify it by its content, and write
files and directories atomically (temporary name, then rename). Loading the tensors is transformers' job."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import json
import os
import shutil
import struct
import tempfile
import threading

from .config import QMiLoRAError

# Tensor-name suffixes that quantized checkpoints carry beside (or instead of) a float `weight`:
# bitsandbytes (absmax, quant_map, quant_state, SCB), GPTQ/AWQ (qweight, qzeros, scales, g_idx).
QUANTIZED_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format",
                      ".qweight", ".qzeros", ".scales", ".g_idx")
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
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, allow_patterns=_HUB_FILES)
    except Exception as err:  # offline, unknown id, gated repo: all end the same way for the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise QMiLoRAError(f"model {source!r} is not a local directory and could not be fetched from the "
                           f"Hugging Face Hub ({type(err).__name__}: {reason})") from None


def resolve_config(source: str) -> str:
    """A local directory holding `source`'s config.json (a Hub id fetches only that file)."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise QMiLoRAError(f"{path} has no config.json: it is not a transformers checkpoint")
        return path
    if path.startswith(("/", ".", "~")) or path.count("/") > 1:
        raise QMiLoRAError(f"model directory {source!r} does not exist")
    from huggingface_hub import hf_hub_download

    try:
        return os.path.dirname(hf_hub_download(source, "config.json"))
    except Exception as err:
        raise QMiLoRAError(f"model {source!r} is not a local directory and its config.json could not be fetched from "
                           f"the Hugging Face Hub ({type(err).__name__})") from None


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


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (hashlib releases the GIL on each chunk, so this overlaps other work in a thread)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class DigestMemo:
    """File digests remembered by (real path, size, mtime, ctime, inode), so an unchanged file is hashed once.

    Any write to a file changes its mtime and ctime (ctime cannot be set back by a user), so a memo hit means the
    bytes are those that were hashed. One small JSON file per stat key under `directory`; None disables the memo.
    """

    def __init__(self, directory: str | None):
        self.directory = directory

    def _path(self, path: str) -> str | None:
        if self.directory is None:
            return None
        st = os.stat(path)
        key = f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"
        return os.path.join(self.directory, hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")

    def get(self, path: str) -> str | None:
        memo = self._path(path)
        try:
            with open(memo) as f:
                return json.load(f)["sha256"]
        except (TypeError, OSError, ValueError, KeyError):
            return None

    def put(self, path: str, digest: str) -> None:
        memo = self._path(path)
        if memo is None:
            return
        try:
            os.makedirs(self.directory, exist_ok=True)
            write_atomic(memo, json.dumps({"path": os.path.realpath(path), "sha256": digest}).encode())
        except OSError:
            pass  # a memo is an optimization: an unwritable cache only costs a rehash next time

    def digest(self, path: str) -> str:
        found = self.get(path)
        if found is None:
            found = file_digest(path)
            self.put(path, found)
        return found


class SourceIdentity:
    """The content identity of a checkpoint: sha256 over config.json and every shard's full bytes.

    Any changed byte in any tensor gives another identity. Shards already hashed (same stat) come from the memo;
    the others can be hashed in a background thread while the caller streams the same files (`start`), so the
    first computation costs little wall time; `value()` waits for it.
    """

    def __init__(self, directory: str, files: list[str], memo: DigestMemo):
        self.directory, self.files, self.memo = directory, list(files), memo
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
        return self._combine()

    def weak(self) -> str:
        """config.json and the shard headers only: equal for two checkpoints that may hold the same content."""
        h = hashlib.sha256(_config_bytes(self.directory))
        for path in self.files:
            h.update(os.path.basename(path).encode())
            h.update(json.dumps(read_header(path), sort_keys=True).encode())
        return h.hexdigest()

    def _combine(self) -> str:
        h = hashlib.sha256(_config_bytes(self.directory))
        for path in sorted(self.files, key=os.path.basename):
            h.update(os.path.basename(path).encode() + b"\0" + self._digests[path].encode())
        return h.hexdigest()


def _config_bytes(directory: str) -> bytes:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return b""
    with open(path, "rb") as f:
        return f.read()


def identity(directory: str, files: list[str], memo: DigestMemo) -> str:
    """The content identity of a checkpoint, computed now (memoized per unchanged shard)."""
    return SourceIdentity(directory, files, memo).value()


def write_atomic(path: str, data: bytes) -> None:
    """Write a file under a temporary name beside it, then rename it into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


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


_TMP, _OLD = ".tmp-", ".old-"


@contextlib.contextmanager
def atomic_dir(target: str, overwrite: bool = False):
    """Yield a temporary directory beside `target`; on success rename it to `target`, on error remove it.

    A process killed midway leaves only a `.<name>.tmp-<pid>-*` directory, never a half-written `target`; the next
    atomic write of the same target removes such leftovers of processes that are no longer running.
    """
    parent = os.path.dirname(os.path.abspath(target)) or "."
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(parent, os.path.basename(target))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}{_TMP}{os.getpid()}-", dir=parent)
    os.chmod(tmp, default_dir_mode())  # mkdtemp's 0700 would otherwise become the output's mode
    try:
        yield tmp
        if os.path.exists(target):
            if not overwrite:
                raise QMiLoRAError(f"{target} already exists")
            old = tempfile.mktemp(prefix=f".{os.path.basename(target)}{_OLD}{os.getpid()}-", dir=parent)
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_dir_mode() -> int:
    """The mode a plain mkdir gives under the user's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def remove_stale_temporaries(parent: str, name: str | None = None) -> list[str]:
    """Remove `.<name>.tmp-<pid>-*` / `.<name>.old-<pid>-*` entries in `parent` whose process has ended (a killed
    run's half-written output: up to a whole merged model). Returns what was removed."""
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in entries:
        if not entry.startswith("."):
            continue
        for mark in (_TMP, _OLD):
            stem, found, rest = entry[1:].partition(mark)
            pid = rest.split("-", 1)[0]
            if found and pid.isdigit() and (name is None or stem == name) and not _alive(int(pid)):
                path = os.path.join(parent, entry)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
                removed.append(entry)
                break
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


def fresh_output(path: str, overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuse to write `path` where that would replace or delete what is there, unless `overwrite`."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise QMiLoRAError(f"output {path} is a file, not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise QMiLoRAError(f"output {path} exists and is not empty; pass {flag} to replace it")
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
        raise QMiLoRAError(f"not enough disk space for {what} in {probe}: needs {needed / 2**30:.2f} GB, "
                           f"{free / 2**30:.2f} GB free")
