"""Issue 16's memory options leave training numerically the same: frozen tensors in the compute dtype, the
chunked loss, activation offload."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import Gemma2Config, Gemma2ForCausalLM

from qmilora import QMiLoRAConfig, loss as lm_loss, prepare_model
from qmilora.cli.train import main

from test_train import argv


def batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    labels = ids.clone()
    labels[0, :10] = -100  # a prompt
    labels[1, 20:] = -100  # padding
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def adapter_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_frozen_tensors_stay_in_the_compute_dtype(tiny_ckpt, cache):
    """PEFT's prepare_model_for_kbit_training would upcast embeddings, head and norms to float32."""
    model = prepare_model(tiny_ckpt[0], QMiLoRAConfig(rank=4, compute_dtype="bfloat16", cache_dir=cache))
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad and p.is_floating_point()}
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in frozen) and any("lm_head" in n for n in frozen)
    assert set(frozen.values()) == {torch.bfloat16}, frozen
    assert trainable and set(trainable.values()) == {torch.float32}
    assert model.base_model.model.is_gradient_checkpointing
    model.train()
    model(**batch(128)).loss.backward()
    grads = adapter_grads(model)
    assert all(torch.isfinite(g).all() for g in grads.values()) and all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("num_items", [None, 40])
def test_chunked_loss_equals_the_models_loss_and_gradients(tiny_ckpt, cache, monkeypatch, num_items):
    model = prepare_model(tiny_ckpt[0], QMiLoRAConfig(rank=4, lora_dropout=0.0, cache_dir=cache))
    model.train()
    b = batch(model.config.vocab_size)
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    own = model(**b, **extra).loss
    own.backward()
    reference = adapter_grads(model)
    model.zero_grad()
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 7 * 4 * model.config.vocab_size)  # several chunks of 7 rows
    with lm_loss.LastHidden(model) as last:
        out = model(**lm_loss.hidden_state_inputs(b))
    assert out.logits.shape[1] == 1 and out.hidden_states is None  # no full-vocabulary logits, no per-layer states
    ours = lm_loss.chunked_causal_lm_loss(model.get_output_embeddings(), last.value, b["labels"],
                                          model.config.vocab_size, num_items)
    ours.backward()
    torch.testing.assert_close(ours, own, rtol=1e-6, atol=1e-7)
    for name, g in adapter_grads(model).items():
        torch.testing.assert_close(g, reference[name], rtol=1e-5, atol=1e-8)
    assert lm_loss.matches_model_loss(model, b)[0]


def test_chunked_loss_with_a_trainable_head_equals_the_models(tiny_ckpt, cache, monkeypatch):
    """A head that trains (not the frozen fast path) runs its chunks under checkpointing: same loss and gradients,
    the head's own included."""
    model = prepare_model(tiny_ckpt[0], QMiLoRAConfig(rank=4, lora_dropout=0.0, cache_dir=cache))
    model.train()
    head = model.get_output_embeddings()
    head.weight.requires_grad_(True)
    b = batch(model.config.vocab_size)
    own = model(**b).loss
    own.backward()
    reference = {**adapter_grads(model)}
    model.zero_grad()
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 5 * 4 * model.config.vocab_size)
    with lm_loss.LastHidden(model) as last:
        model(**lm_loss.hidden_state_inputs(b))
    ours = lm_loss.chunked_causal_lm_loss(head, last.value, b["labels"], model.config.vocab_size)
    ours.backward()
    torch.testing.assert_close(ours, own, rtol=1e-6, atol=1e-7)
    grads = adapter_grads(model)
    assert any("lm_head" in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, reference[name], rtol=1e-5, atol=1e-8)


def test_chunked_loss_is_refused_where_the_model_post_processes_logits():
    """Gemma 2 soft-caps its logits after the head: the check (not the architecture's name) turns it off."""
    torch.manual_seed(0)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16, vocab_size=128)
    capped = Gemma2ForCausalLM(Gemma2Config(**cfg, final_logit_softcapping=0.5))
    with torch.no_grad():
        capped.lm_head.weight.mul_(100)  # logits large enough for the cap to bite
    agree, own, ours = lm_loss.matches_model_loss(capped, batch(128))
    assert not agree and abs(own - ours) > 1e-3
    plain = Gemma2ForCausalLM(Gemma2Config(**cfg, final_logit_softcapping=None))
    assert lm_loss.matches_model_loss(plain, batch(128))[0]


def run_summary(out):
    return json.load(open(out / "qmilora.json"))["summary"]


def test_training_is_the_same_with_every_memory_option(tiny_llm, tmp_path, cache):
    """Gradient accumulation, packing and evaluation, with and without the options: same losses, same eval loss,
    same adapter (within float rounding). The reference runs PEFT's own LoRA layers and the model's loss; the others
    the fused LoRA function (with dropout: the same masks). Resuming with the chunked loss (the default) is
    test_train's kill -9 test."""
    common = ("--max_steps", "4", "--learning_rate", "5e-3", "--lora_dropout", "0.1", "--val_size", "16",
              "--gradient_accumulation_steps", "2", "--packing", "true", "--eval_steps", "2", "--save_steps", "2")
    plain, chunked, offloaded = tmp_path / "plain", tmp_path / "chunked", tmp_path / "offloaded"
    assert main(argv(tiny_llm, plain, cache, *common, "--chunked_loss", "false", "--fused_lora", "false")) == 0
    assert main(argv(tiny_llm, chunked, cache, *common)) == 0
    assert main(argv(tiny_llm, offloaded, cache, *common, "--offload_activations", "true")) == 0
    assert run_summary(plain)["loss"] == "model" and run_summary(offloaded)["loss"] == "chunked"

    def history(out, key):
        return [h[key] for h in json.load(open(out / "checkpoint-4" / "trainer_state.json"))["log_history"] if key in h]

    for out in (chunked, offloaded):
        assert history(out, "loss") == pytest.approx(history(plain, "loss"), rel=1e-5)
        assert history(out, "eval_loss") == pytest.approx(history(plain, "eval_loss"), rel=1e-5)
        a, b = load_file(out / "adapter_model.safetensors"), load_file(plain / "adapter_model.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_half_precision_on_a_cpu_without_its_instructions_is_flagged(tiny_ckpt, cache, monkeypatch, caplog):
    from qmilora import cpu

    assert not cpu.slow_half_precision(torch.float32)
    monkeypatch.setattr(cpu, "slow_half_precision", lambda dtype: dtype == torch.bfloat16)
    with caplog.at_level("WARNING", logger="qmilora"):
        prepare_model(tiny_ckpt[0], QMiLoRAConfig(rank=4, compute_dtype="bfloat16", cache_dir=cache))
    assert "no bfloat16 matrix instructions" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="qmilora"):
        prepare_model(tiny_ckpt[0], QMiLoRAConfig(rank=4, compute_dtype="float32", cache_dir=cache))
    assert "matrix instructions" not in caplog.text


def test_gpu_training_defaults_work_on_cpu(tiny_llm, tmp_path, cache, monkeypatch):
    """The GPU's defaults (bfloat16 compute, `bf16=True` mixed precision) reproduced on a CPU. Under autocast the
    last hidden states can come out in float32 while the head is bfloat16, and the chunked loss runs after the
    autocast forward: it stopped every GPU run with "mat1 and mat2 must have the same dtype" (found on an H200),
    because accelerate returned every layer's hidden states converted to float32.
    The chunked loss must train and log the same losses as the model's own loss."""
    common = ("--max_steps", "2", "--learning_rate", "5e-3", "--lora_dropout", "0", "--compute_dtype", "bfloat16",
              "--bf16", "true", "--save_steps", "2", "--logging_steps", "1")
    plain, chunked = tmp_path / "plain", tmp_path / "chunked"
    assert main(argv(tiny_llm, plain, cache, *common, "--chunked_loss", "false")) == 0
    seen = []
    original = lm_loss.chunked_causal_lm_loss
    monkeypatch.setattr(lm_loss, "chunked_causal_lm_loss", lambda head, hidden, *a: seen.append(hidden.dtype) or
                        original(head, hidden, *a))
    assert main(argv(tiny_llm, chunked, cache, *common)) == 0
    # the hidden states as the head sees them, not accelerate's float32 copies of every layer's output
    assert seen and set(seen) == {torch.bfloat16}
    assert run_summary(plain)["loss"] == "model" and run_summary(chunked)["loss"] == "chunked"

    def losses(out):
        return [h["loss"] for h in json.load(open(out / "checkpoint-2" / "trainer_state.json"))["log_history"]
                if "loss" in h]

    assert len(losses(chunked)) == 2 and losses(chunked) == pytest.approx(losses(plain), rel=2e-2)


def test_chunked_loss_casts_hidden_states_to_the_heads_dtype():
    """Hidden states in float32 before a bfloat16 head (a norm kept in float32 under mixed precision): the loss
    casts at the boundary, as autocast would, instead of failing in the matmul."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).to(torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(2, 6, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 6))
    ours = lm_loss.chunked_causal_lm_loss(head, hidden, labels, 50)
    ref = lm_loss.chunked_causal_lm_loss(head, hidden.to(torch.bfloat16), labels, 50)
    torch.testing.assert_close(ours, ref)
    ours.backward()
    assert hidden.grad is not None and hidden.grad.dtype == torch.float32 and hidden.grad.abs().sum() > 0
