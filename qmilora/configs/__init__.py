"""config.json of the common model families, shipped so that `qmilora-plan` answers for them by name with no network.

Each file holds the fields of the Hub repository's config.json that build the model (shapes, vocabulary, experts,
attention layout); the plan reads nothing else. `locate` turns whatever the user passed as --model into one
config.json: a file, a checkpoint directory, a shipped family (by Hub id or short name), the Hugging Face cache, or
one quick request to the Hub, which fails in one line when the Hub cannot be reached instead of retrying for 30 s.
"""
from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))

# Hub id -> shipped file. Chat/instruct variants share their base's shapes; listed only where the file is theirs too.
FAMILIES = {
    "meta-llama/Llama-2-7b-hf": "llama-2-7b",
    "meta-llama/Llama-2-7b-chat-hf": "llama-2-7b",
    "meta-llama/Llama-2-13b-hf": "llama-2-13b",
    "meta-llama/Llama-2-13b-chat-hf": "llama-2-13b",
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama-3-8b",
    "mistralai/Mistral-7B-v0.1": "mistral-7b",
    "Qwen/Qwen2.5-7B": "qwen2.5-7b",
    "Qwen/Qwen3-30B-A3B": "qwen3-30b-a3b",
    "openai/gpt-oss-20b": "gpt-oss-20b",
}
NOTES = {
    # the Hub's weights are MXFP4; the plan is for the bf16 weights QMiLoRA decomposes (a quantized source is refused)
    "gpt-oss-20b": "the plan assumes bf16 weights: openai/gpt-oss-20b ships MXFP4, which qmilora-train refuses "
                   "(train from a bf16 copy)",
}


def shipped(model: str) -> str | None:
    """The shipped config.json for a Hub id or short name (case-insensitive), or None."""
    wanted = model.strip().lower()
    for hub_id, stem in FAMILIES.items():
        if wanted in (hub_id.lower(), hub_id.split("/")[1].lower(), stem):
            return os.path.join(HERE, f"{stem}.json")
    return None


def names() -> list[str]:
    return sorted(set(FAMILIES.values()))


def locate(model: str, error) -> tuple[str, str | None]:
    """(path of a config.json file, a line saying where it came from or None for the user's own files) for `model`;
    `error(message)` raises the command's one-line error."""
    path = os.path.expanduser(model)
    if os.path.isfile(path):
        return path, None
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            error(f"{path} has no config.json: pass a checkpoint directory, a config.json file, or a family name "
                  f"({', '.join(names())})")
        return os.path.join(path, "config.json"), None
    found = shipped(model)
    if found is not None:
        stem = os.path.basename(found)[:-5]
        note = f"config.json: the copy shipped with qmilora for {stem} (no network)"
        return found, note + (f"; {NOTES[stem]}" if stem in NOTES else "")
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or path.endswith(".json"):
        error(f"{model!r} does not exist; pass a checkpoint directory, a config.json file, a Hub id, or a family name "
              f"({', '.join(names())})")
    return _from_hub(model, error), f"config.json: {model} on the Hugging Face Hub"


def _from_hub(model: str, error) -> str:
    import logging

    from huggingface_hub import constants, hf_hub_download

    try:  # fetched before (or by transformers): no network needed
        return hf_hub_download(model, "config.json", local_files_only=True)
    except Exception:  # noqa: BLE001 - absent from the cache, whatever the exception
        pass
    unreachable = (f"cannot fetch {model}'s config.json: the Hugging Face Hub is not reachable from here; pass a "
                   f"checkpoint directory, a config.json file, or a family name ({', '.join(names())})")
    if constants.HF_HUB_OFFLINE or not _reachable(constants.ENDPOINT):
        error(unreachable)
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings; the failure is reported once, below
    try:
        return hf_hub_download(model, "config.json", etag_timeout=5)
    except Exception as err:  # noqa: BLE001 - unknown id, gated repository, network: one line each
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        error(f"cannot fetch {model}'s config.json from the Hugging Face Hub ({type(err).__name__}: {reason})")
    finally:
        hub_log.setLevel(level)


def _reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """One TCP connection to the Hub's host: a machine without network fails here in milliseconds, where the Hub
    client would retry for half a minute. Through a proxy only the request itself can tell."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False
