"""Held-out English text that PyPI packages ship, for perplexity (forgetting, quantization damage).

    news     300 Australian Broadcasting Corporation news articles (the "Lee" corpus) in gensim's test data
             (`pip install --no-deps gensim`; the file is read, gensim is never imported)
    pydoc    CPython's own reference-manual topics (`pydoc_data.topics`, PSF license, in every Python)

Each source yields documents; `chunks` tokenizes them into fixed-length windows (one per document, so a few
long documents cannot dominate).
"""
from __future__ import annotations

import importlib.util
import os

SOURCES = ("news", "pydoc")


def documents(source: str) -> list[str]:
    if source == "news":
        spec = importlib.util.find_spec("gensim")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("the news text ships in gensim's test data: pip install --no-deps gensim")
        path = os.path.join(spec.submodule_search_locations[0], "test", "test_data", "lee_background.cor")
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.strip() for line in f if line.strip()]
    if source == "pydoc":
        from pydoc_data.topics import topics

        return [topics[k].strip() for k in sorted(topics) if len(topics[k]) > 1000]
    raise SystemExit(f"unknown text source {source!r}: choose from {', '.join(SOURCES)}")


def chunks(source: str, tokenizer, *, count: int, length: int, offset: int = 0) -> list[list[int]]:
    """Up to `count` windows of exactly `length` tokens, the first window of each document from `offset` on."""
    out = []
    for doc in documents(source)[offset:]:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == count:
            break
    return out


def perplexity(model, windows: list[list[int]], tokenizer, *, batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) over the windows, with qmilora-eval's own loss (float32 logits)."""
    import math

    from qmilora.fidelity import mean_loss

    rows = [{"input_ids": w, "attention_mask": [1] * len(w), "labels": w} for w in windows]
    return math.exp(mean_loss(model, rows, tokenizer, batch_size))
