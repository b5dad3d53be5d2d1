"""The causal-LM loss without full-vocabulary logits, and activation offload.

transformers' loss materializes logits for every position, in float32, and keeps them (and their gradient) for
backward: T·V·4 bytes per copy, e.g. 2048 tokens × 128,256 vocab ≈ 1 GB, 16.8 GB at 32k tokens. The same loss,

    L = Σ_t CE(head(h_t), y_{t+1}) / N        (h: the model's last hidden states, N: supervised tokens)

is computed here over the supervised positions only (responses, by default), in chunks of rows whose float32 logits
fit CHUNK_BYTES. With a frozen linear head (the usual case) each chunk's gradient is taken in the forward pass,
since the loss is the last operation: ∂L/∂h = (softmax(h·Wᵀ + b) − onehot(y))·W, kept (N×H, small) and scaled by
the incoming gradient in backward; the same two matmuls per row as the model's loss, no recompute. A trainable head
(LoRA on lm_head) runs each chunk under activation checkpointing instead: backward recomputes its logits. Peak:
one chunk of logits instead of all of them.

It relies on the base model's last hidden states being what the head sees (`LastHidden`), and on
`logits = head(h)` with nothing after it. Models that post-process logits (soft-capping, scaling) break that; so
`matches_model_loss` compares it with the model's own loss on a real batch before training, and qmilora-train uses
it only when they agree. On CUDA, `--use_liger_kernel` (transformers' Liger integration, a fused
linear-cross-entropy kernel) is used instead when asked for.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_BYTES = 2**26  # float32 logits per chunk: 64 MiB, ~130 rows at a 128k vocabulary
IGNORE = -100


def chunked_causal_lm_loss(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, vocab: int,
                           num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """transformers' causal-LM loss (labels shifted left by one, -100 ignored, summed, divided by
    `num_items_in_batch` or by the supervised count). hidden (B, T, H), labels (B, T) -> scalar float32."""
    targets = F.pad(labels, (0, 1), value=IGNORE)[:, 1:].reshape(-1).to(hidden.device)
    keep = targets != IGNORE
    rows, targets = hidden.reshape(-1, hidden.shape[-1])[keep], targets[keep]
    # Under mixed precision (bf16=True, the GPU default) the model's forward runs in autocast but this loss, after
    # it, does not: the hidden states can arrive in float32 while the head is in the compute dtype. Cast at the
    # boundary, as autocast would have. (PEFT layers expose their base layer's weight, so a LoRA head works too.)
    rows = rows.to(head.weight.dtype)
    step = max(1, CHUNK_BYTES // (4 * vocab))
    if type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters()):
        total = _FrozenHeadCrossEntropy.apply(rows, head.weight, head.bias, targets, step)
    else:
        total = rows.sum() * 0.0  # keeps the graph when nothing is supervised
        for i in range(0, rows.shape[0], step):
            total = total + checkpoint(_chunk_loss, head, rows[i:i + step], targets[i:i + step], use_reentrant=False)
    denominator = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return total.float() / denominator


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Σ CE(rows·Wᵀ + b, targets) for a frozen head; the gradient w.r.t. rows is computed chunk by chunk here."""

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, step):
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad = torch.zeros_like(rows) if ctx.needs_input_grad[0] else None
        for i in range(0, rows.shape[0], step):
            y = targets[i:i + step]
            logits = F.linear(rows[i:i + step], weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(y.shape[0], device=y.device), y] -= 1
                grad[i:i + step] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None


def _chunk_loss(head, rows, targets):
    return F.cross_entropy(head(rows).float(), targets, reduction="sum")


def hidden_state_inputs(inputs: dict) -> dict:
    """The model's inputs for `chunked_causal_lm_loss`: no labels (no built-in loss), logits for one position only.
    The hidden states come from `LastHidden`."""
    return {**{k: v for k, v in inputs.items() if k != "labels"}, "logits_to_keep": 1}


class LastHidden:
    """Within `with LastHidden(model) as last:`, `last.value` is the hidden state the head sees (the base model's
    `last_hidden_state`, through a forward hook). Asking the model for `output_hidden_states` instead returns every
    layer's; under mixed precision accelerate converts each returned tensor to float32: a float32 copy of all layers'
    hidden states (1 GB for a 7B model at 2048 tokens) alive through the loss."""

    def __init__(self, model):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's model
        self.module, self.value = inner.base_model, None  # transformers' base_model_prefix: the decoder stack

    def _hook(self, module, args, output):
        self.value = output[0]  # ModelOutput or tuple: last_hidden_state first

    def __enter__(self):
        self.handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@torch.no_grad()
def matches_model_loss(model, batch: dict, rtol: float = 1e-3) -> tuple[bool, float, float]:
    """Whether the chunked loss equals the model's own loss on `batch` (eval mode): (agree, own, chunked)."""
    was_training = model.training
    model.eval()
    try:
        own = float(model(**batch).loss)
        try:
            with LastHidden(model) as last:
                model(**hidden_state_inputs(batch))
            hidden = last.value
            if not torch.is_tensor(hidden) or hidden.shape[:2] != batch["labels"].shape:
                return False, own, float("nan")
        except (TypeError, AttributeError, IndexError):  # no logits_to_keep / base model: cannot be used
            return False, own, float("nan")
        ours = float(chunked_causal_lm_loss(model.get_output_embeddings(), hidden, batch["labels"],
                                            model.config.get_text_config().vocab_size))
    finally:
        model.train(was_training)
    return abs(own - ours) <= rtol * abs(own) + 1e-6, own, ours


def offload(enabled: bool):
    """Keep the tensors autograd saves in the forward (with activation checkpointing: each block's input) in
    pinned host memory until backward needs them."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
