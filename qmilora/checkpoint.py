"""Checkpoint I/O: locate a safetensors checkpoint, stream its tensors one at a time, fingerprint it,
and write directories atomically (temporary name, then rename)."""
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
from collections.abc import Iterator

import torch
from safetensors import safe_open

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
    """The safetensors JSON header (names, dtypes, shapes, offsets) without touching tensor data."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def tensor_names(files: list[str]) -> list[str]:
    return [k for f in files for k in read_header(f) if k != "__metadata__"]


def iter_tensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time; a shard's memory map is closed before the next is opened.

    Each tensor is copied out of the map: a tensor that views the map keeps the whole shard mapped (and its
    touched pages resident) for as long as the model holds it, so every shard would stay in memory.
    """
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name).clone()


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


def fingerprint(directory: str, files: list[str], sample_bytes: int = 1 << 20) -> str:
    """Identity of a checkpoint: sha256 over config.json and, per shard, its name, header (tensor names, dtypes,
    shapes, offsets) and the first `sample_bytes` of tensor data.

    Cheap (1 MiB read per shard), survives copying and re-downloading, and tells apart two checkpoints of the
    same architecture (their weights differ from the first bytes on).
    """
    h = hashlib.sha256()
    config = os.path.join(directory, "config.json")
    if os.path.isfile(config):
        with open(config, "rb") as f:
            h.update(f.read())
    for path in files:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            h.update(os.path.basename(path).encode())
            h.update(f.read(length))
            h.update(f.read(sample_bytes))
    return h.hexdigest()


def refuse_quantized_config(config) -> None:
    qc = getattr(config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else getattr(qc, "quant_method", "unknown")
        raise QMiLoRAError(
            f"the checkpoint is already quantized ({method}): QMiLoRA needs full-precision weights, because the "
            "minor singular components of a quantized weight are mostly quantization noise; use the original model")


def refuse_quantized_tensors(names: list[str]) -> None:
    hits = [n for n in names if n.endswith(QUANTIZED_SUFFIXES) or ".quant_state." in n]
    if hits:
        raise QMiLoRAError(
            f"the checkpoint holds quantized tensors (e.g. {hits[0]}): QMiLoRA needs full-precision weights, because "
            "the minor singular components of a quantized weight are mostly quantization noise; use the original model")


@contextlib.contextmanager
def atomic_dir(target: str, overwrite: bool = False):
    """Yield a temporary directory beside `target`; on success rename it to `target`, on error remove it.

    A process killed midway leaves only a `.tmp-*` directory, never a half-written `target`.
    """
    parent = os.path.dirname(os.path.abspath(target)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(target):
            if not overwrite:
                raise QMiLoRAError(f"{target} already exists")
            old = tmp + ".old"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
