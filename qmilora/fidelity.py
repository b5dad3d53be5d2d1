"""How far a model lands from the trained one, on a few rows the run already has: the supervised tokens of its eval
split (or, without one, of its first training rows). Two numbers per model: its mean loss there, and the share of
those positions whose top-1 token equals the trained model's (the trained model itself scores 100%).

The trained model is `load_trained`'s: the NF4 residual plus s·B·A, as it ran in training and in qmilora-eval."""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch

from .config import QMiLoRAError

log = logging.getLogger("qmilora")
IGNORE = -100


def diverged(where: str = "") -> QMiLoRAError:
    """The refusal of a trained model whose outputs are NaN or infinite (its weights may still be finite)."""
    from .checks import DIVERGED

    return QMiLoRAError(f"the trained model gives non-finite outputs (NaN/Inf){where}: its training diverged; in "
                        f"qmilora-train, {DIVERGED}")


def require_finite(model) -> None:
    """One forward of `model` on a few token ids, refused (`diverged`) unless every logit is finite: a diverged
    run's model gives NaN on any input, and nothing it produces (a loss, an answer, an export) means anything."""
    ids = torch.arange(8).remainder(model.get_input_embeddings().num_embeddings)[None]
    with torch.no_grad():
        if not torch.isfinite(model(input_ids=ids.to(next(model.parameters()).device)).logits).all():
            raise diverged()


@dataclass
class Rows:
    rows: list[dict]  # tokenized {input_ids, attention_mask, labels}
    where: str  # "eval split" or "training rows", for the report
    tokens: int  # supervised target positions


@dataclass
class Score:
    artifact: str
    loss: float
    top1_agreement: float  # share of supervised positions with the trained model's top-1 token
    tokens: int
    rows: str

    def line(self, trained_loss: float) -> str:
        return (f"{self.artifact}: loss {self.loss:.4f} ({self.loss - trained_loss:+.4f} vs the trained model), "
                f"top-1 agreement {100 * self.top1_agreement:.1f}% on {self.tokens} supervised tokens of "
                f"{self.rows}")

    def to_dict(self) -> dict:
        return asdict(self)


def run_data(run_dir: str, meta: dict, tokenizer) -> tuple | None:
    """(the run's training rows, its eval split or None), rebuilt from the recorded data config (the split is seeded,
    so these are the rows the run held out); None when the data is no longer readable. Build it once and `take`
    from it as often as needed."""
    from .data import DataConfig, build_dataset

    try:
        # the run's saved tokenizer carries the chat template it trained with: the recorded file may have moved
        train, held, _ = build_dataset(DataConfig(**{**meta["data"], "chat_template": "model"}), tokenizer)
    except (QMiLoRAError, TypeError, ValueError) as err:  # the data file moved, or the record predates a field
        log.warning("qmilora: cannot rebuild the run's data to measure fidelity (%s)", err)
        return None
    return train, held


def take(built: tuple, limit: int, split: str = "eval") -> Rows:
    """Up to `limit` rows of `run_data`'s eval split (else of its training rows), or with split="train" of its
    training rows."""
    train, held = built
    if held is not None and split == "eval":
        data, where = held, "the eval split"
    else:
        data, where = train, "the first training rows"
    rows = [data[i] for i in range(min(limit, len(data)))]
    tokens = sum(sum(1 for t in r["labels"][1:] if t != IGNORE) for r in rows)
    return Rows(rows, f"{len(rows)} rows of {where}", tokens)


def run_rows(run_dir: str, meta: dict, tokenizer, limit: int, split: str = "eval") -> Rows | None:
    """`take(run_data(...), limit, split)`: None when the data is no longer readable."""
    built = run_data(run_dir, meta, tokenizer)
    return None if built is None else take(built, limit, split)


def _batches(model, rows, tokenizer, batch_size: int = 4, desc: str | None = None):
    """(logits at the supervised positions (n, vocab) float32, their targets (n,)) per batch of `rows` (a list or a
    dataset of tokenized rows), with a progress bar on a terminal when `desc` names it."""
    from tqdm.auto import tqdm
    from transformers import DataCollatorForSeq2Seq

    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)
    device = next(model.parameters()).device
    model.eval()
    starts = range(0, len(rows), batch_size)
    with torch.no_grad():
        for i in tqdm(starts, desc=desc, unit="batch", disable=None if desc else True):
            batch = collate([rows[j] for j in range(i, min(i + batch_size, len(rows)))])
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits[:, :-1]
            labels = batch["labels"][:, 1:].to(device)
            keep = labels != IGNORE
            yield logits[keep].float(), labels[keep]


def _loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits.double(), targets, reduction="sum").item()


def mean_loss(model, rows, tokenizer, batch_size: int = 4, desc: str | None = None) -> float:
    """Token-weighted mean cross-entropy (summed in float64) over the supervised positions of `rows` (a list or a
    dataset of tokenized rows)."""
    total, count = 0.0, 0
    for logits, targets in _batches(model, rows, tokenizer, batch_size, desc):
        total, count = total + _loss_sum(logits, targets), count + len(targets)
    if not count:
        raise QMiLoRAError("the rows hold no supervised tokens to compute a loss on")
    return total / count


def reference(model, rows: Rows, tokenizer) -> tuple[float, list[torch.Tensor]]:
    """The trained model's mean loss on `rows` and its top-1 tokens there (per batch); refused (`diverged`) where
    that loss is not finite: no agreement with a NaN model means anything."""
    total, tops = 0.0, []
    for logits, targets in _batches(model, rows.rows, tokenizer):
        total += _loss_sum(logits, targets)
        tops.append(logits.argmax(-1).cpu())
    if not math.isfinite(total):
        raise diverged(f" on {rows.where}")
    return total / max(rows.tokens, 1), tops


def score(name: str, model, rows: Rows, tokenizer, tops: list[torch.Tensor]) -> Score:
    total, same = 0.0, 0
    for (logits, targets), top in zip(_batches(model, rows.rows, tokenizer), tops, strict=True):
        total += _loss_sum(logits, targets)
        same += int((logits.argmax(-1).cpu() == top).sum())
    return Score(name, total / max(rows.tokens, 1), same / max(rows.tokens, 1), rows.tokens, rows.where)
