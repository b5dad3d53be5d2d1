import pytest
import torch
from transformers import AutoConfig

from qmilora import QMiLoRAConfig, prepare_model
from qmilora.cli.plan import main as plan_main
from qmilora.plan import PlanConfig, bytes_per_4bit_weight, count, parse_size, plan
from qmilora.quantize import is_4bit_linear

from conftest import save_tiny


@pytest.fixture(scope="module")
def even_ckpt(tmp_path_factory):
    """Weights whose sizes fill whole quantization blocks (and whole blocks of 256 absmax values)."""
    d = tmp_path_factory.mktemp("even")
    save_tiny(d, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4, vocab_size=64)
    return str(d)


def state_bytes(qs) -> int:
    tensors = [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code, qs.offset] if qs.nested else [])
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("double_quant, blocksize", [(True, 64), (False, 64), (False, 128)])
def test_4bit_bytes_match_a_prepared_model(even_ckpt, tmp_path, double_quant, blocksize):
    model = prepare_model(even_ckpt, rank=8, double_quant=double_quant, blocksize=blocksize, cache_dir=str(tmp_path))
    layers = [m for m in model.modules() if is_4bit_linear(m)]
    actual = sum(m.weight.numel() * m.weight.element_size() + state_bytes(m.weight.quant_state) for m in layers)
    numel = sum(m.in_features * m.out_features for m in layers)
    per_layer_constants = (16 + (256 + 1 if double_quant else 0)) * 4  # the NF4 code table (+ nested code, offset)
    assert actual == pytest.approx(numel * bytes_per_4bit_weight(blocksize, double_quant) + len(layers) * per_layer_constants,
                                   abs=1)


def test_counts_match_the_prepared_model(even_ckpt, tmp_path):
    hf = AutoConfig.from_pretrained(even_ckpt)
    for targets in (["all-linear"], ["q_proj", "down_proj"]):
        model = prepare_model(even_ckpt, rank=8, target_modules=targets, cache_dir=str(tmp_path))
        c = count(hf, targets, 8)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert 8 * c["adapter_in_out"] == trainable
        linear = sum(m.in_features * m.out_features for m in model.modules() if is_4bit_linear(m))
        assert c["linear"] == linear
        other = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and p.dtype != torch.uint8)
        assert c["other"] == other


def test_frozen_bytes_follow_the_compute_dtype(even_ckpt, tmp_path):
    """The frozen non-4-bit tensors (embeddings, head, norms) take compute-dtype bytes, byte-exact."""
    from qmilora import QMiLoRAConfig

    hf = AutoConfig.from_pretrained(even_ckpt)
    for dtype in ("float32", "bfloat16"):
        qcfg = QMiLoRAConfig(rank=8, compute_dtype=dtype, cache_dir=str(tmp_path))
        model = prepare_model(even_ckpt, qcfg)
        layers = [m for m in model.modules() if is_4bit_linear(m)]
        four_bit = sum(m.weight.numel() * m.weight.element_size() + state_bytes(m.weight.quant_state) for m in layers)
        other = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                    if "lora_" not in n and p.dtype != torch.uint8)
        p = plan(PlanConfig(model=even_ckpt), qcfg, hf)
        per_layer_constants = len(layers) * (16 + 256 + 1) * 4
        assert p["quantized_weights_gb"] * 2**30 == pytest.approx(four_bit + other - per_layer_constants, abs=1)


def test_memory_options_in_the_plan(even_ckpt, capsys, monkeypatch):
    from qmilora import QMiLoRAConfig, loss

    monkeypatch.setattr(loss, "CHUNK_BYTES", 2**20)  # the tiny vocabulary's logits: many chunks
    hf = AutoConfig.from_pretrained(even_ckpt)
    q = QMiLoRAConfig(rank=8, compute_dtype="bfloat16")
    long = dict(model=even_ckpt, max_seq_length=2**16)  # logits of 2^16 tokens: far more than one chunk
    full = plan(PlanConfig(**long, chunked_loss=False), q, hf)
    chunked = plan(PlanConfig(**long), q, hf)
    offloaded = plan(PlanConfig(**long, offload_activations=True), q, hf)
    assert full["logits_gb"] == pytest.approx(3 * 2**16 * 64 * 4 / 2**30) and chunked["logits_gb"] < full["logits_gb"]
    assert offloaded["activations_gb"] + offloaded["offloaded_gb"] == pytest.approx(chunked["activations_gb"])
    assert chunked["qlora_train_peak_gb"] > full["train_peak_gb"] >= chunked["train_peak_gb"]
    # with checkpointing the logits and the recomputed layer are never alive together: the larger one counts
    for p in (full, chunked):
        assert p["transient_gb"] >= p["logits_gb"]
    assert full["train_peak_gb"] - full["transient_gb"] == pytest.approx(chunked["train_peak_gb"] - chunked["transient_gb"])
    big_vocab = AutoConfig.from_pretrained(even_ckpt, vocab_size=32000)  # logits dominate: the chunked loss helps
    assert plan(PlanConfig(**long, chunked_loss=False), q, big_vocab)["train_peak_gb"] > \
        plan(PlanConfig(**long), q, big_vocab)["train_peak_gb"] + 3 * 2**16 * 32000 * 4 / 2**30 * 0.9
    tight = plan(PlanConfig(**long), q, hf)["train_peak_gb"] * 0.99  # just too small without offload
    assert plan_main(["--model", even_ckpt, "--rank", "8", "--max_seq_length", str(2**16), "--gpu_memory",
                      f"{tight * 1024:.1f}MB"]) == 0
    assert "fits with --offload_activations true" in capsys.readouterr().out


def test_tiled_mlp_in_the_plan(capsys):
    """The recomputed layer from the MLP's width: Llama-2-7B's measured 34·h per token is kept (within 1%), and
    with --tiled_mlp only one tile of the MLP part counts, so Llama-3-8B's long contexts shrink to what the
    checkpoints and the attention part need."""
    from qmilora import QMiLoRAConfig
    from qmilora.configs import locate

    q = QMiLoRAConfig(rank=64, compute_dtype="bfloat16")
    llama2 = AutoConfig.from_pretrained(locate("llama-2-7b", None)[0])
    p = plan(PlanConfig(model="x", max_seq_length=2048, chunked_loss=False), q, llama2)
    calibrated = 2048 * 34 * 4096 / 2**30
    assert p["transient_gb"] == pytest.approx(max(calibrated, p["logits_gb"]), rel=0.01)
    llama3 = AutoConfig.from_pretrained(locate("llama-3-8b", None)[0])
    seq = 2**17
    whole = plan(PlanConfig(model="x", max_seq_length=seq, offload_activations=True), q, llama3)
    tiled = plan(PlanConfig(model="x", max_seq_length=seq, offload_activations=True, tiled_mlp=True), q, llama3)
    h, m = 4096, 14336
    assert whole["transient_gb"] == pytest.approx(seq * (10 * h + 9 * m) / 2**30)
    assert tiled["transient_gb"] == pytest.approx((seq * 12 * h + h * 9 * m) / 2**30)
    assert tiled["train_peak_gb"] < 24 < whole["train_peak_gb"]
    assert plan_main(["--model", "llama-3-8b", "--max_seq_length", str(seq), "--offload_activations", "true"]) == 0
    assert "fits with --tiled_mlp true" in capsys.readouterr().out


def test_packing_mask_in_the_plan(capsys):
    """A packed micro-batch under SDPA carries a (batch·seq)² boolean mask (transformers builds one as soon as a row
    holds several examples): forced packing counts it, the automatic default only up to PACKED_MASK_TOKENS, where
    qmilora-train packs; one example per row, or padded batches, none. The advice offers --packing false."""
    from qmilora import QMiLoRAConfig
    from qmilora.configs import locate
    from qmilora.data import PACKED_MASK_TOKENS

    q = QMiLoRAConfig(rank=64, compute_dtype="bfloat16")
    llama3 = AutoConfig.from_pretrained(locate("llama-3-8b", None)[0])
    at = lambda batch, seq, **kw: plan(PlanConfig(model="x", per_device_train_batch_size=batch, max_seq_length=seq,  # noqa: E731
                                                  **kw), q, llama3)
    forced, padded = at(4, 8192, packing=True), at(4, 8192, packing=False)
    assert forced["packing_mask_gb"] == pytest.approx(32768**2 / 2**30)
    assert forced["train_peak_gb"] - padded["train_peak_gb"] == pytest.approx(1.0)
    assert forced["qlora_train_peak_gb"] - padded["qlora_train_peak_gb"] == pytest.approx(1.0)
    assert at(4, 8192)["packing_mask_gb"] == 0  # automatic: padded beyond PACKED_MASK_TOKENS per row
    assert at(2, PACKED_MASK_TOKENS // 2)["packing_mask_gb"] == pytest.approx(PACKED_MASK_TOKENS**2 / 2**30)
    assert at(1, 2**17, packing=True)["packing_mask_gb"] == 0
    assert at(4, 8192, packing=True, fused_attention=False)["packing_mask_gb"] == pytest.approx(2 * 32768**2 / 2**30)
    tight = f"{(padded['train_peak_gb'] + 0.5) * 1024:.0f}MB"
    assert plan_main(["--model", "llama-3-8b", "--per_device_train_batch_size", "4", "--max_seq_length", "8192",
                      "--packing", "true", "--gpu_memory", tight]) == 0
    out = capsys.readouterr().out
    assert "packed row's attention mask" in out and "fits with --packing false" in out


def test_plan_arithmetic_and_cli(even_ckpt, capsys):
    from qmilora import QMiLoRAConfig

    Q8 = QMiLoRAConfig(rank=8)
    hf = AutoConfig.from_pretrained(even_ckpt)
    small = plan(PlanConfig(model=even_ckpt, max_seq_length=64), Q8, hf)
    long = plan(PlanConfig(model=even_ckpt, max_seq_length=128), Q8, hf)
    assert long["logits_gb"] == pytest.approx(2 * small["logits_gb"])
    assert long["quantized_weights_gb"] == small["quantized_weights_gb"]
    no_ckpt = plan(PlanConfig(model=even_ckpt, max_seq_length=64, activation_checkpointing=False), Q8, hf)
    assert no_ckpt["activations_gb"] > small["activations_gb"]
    adamw = plan(PlanConfig(model=even_ckpt, optim="adamw_torch"), Q8, hf)
    assert adamw["grads_and_optimizer_gb"] == pytest.approx(small["grads_and_optimizer_gb"] * 12 / 6)
    ddp = plan(PlanConfig(model=even_ckpt, max_seq_length=64, num_gpus=2), Q8, hf)  # + one fp32 bucket copy
    assert ddp["grads_and_optimizer_gb"] - small["grads_and_optimizer_gb"] == pytest.approx(small["adapters_gb"])
    assert ddp["global_batch_tokens"] == 2 * 64 and ddp["activations_gb"] == small["activations_gb"]
    assert plan_main(["--model", even_ckpt, "--rank", "8", "--num_gpus", "2"]) == 0
    assert "per GPU, on each of 2" in capsys.readouterr().out
    assert plan_main(["--model", even_ckpt, "--rank", "8", "--gpu_memory", "24GB"]) == 0
    assert "fits in 24 GB" in capsys.readouterr().out
    assert plan_main(["--model", even_ckpt, "--gpu_memory", "1MB"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert plan_main(["--model", even_ckpt, "--gpu_memory", "lots"]) == 1
    assert parse_size("1.5GB") == 1.5 * 2**30 and parse_size("800MB") == 800 * 2**20


def test_fsdp_shards_weights_adapters_and_optimizer(even_ckpt):
    """--fsdp over n GPUs: each holds 1/n of the weights, adapters, gradients and optimizer state plus two gathered
    decoder layers; activations are not sharded; preparation puts only the solver on the GPU."""
    from qmilora import QMiLoRAConfig

    hf = AutoConfig.from_pretrained(even_ckpt)
    q = QMiLoRAConfig(rank=8, compute_dtype="bfloat16")
    one = plan(PlanConfig(model=even_ckpt), q, hf)
    for n in (2, 4):
        sharded = plan(PlanConfig(model=even_ckpt, num_gpus=n, fsdp=True), q, hf)
        layers = hf.num_hidden_layers
        assert sharded["quantized_weights_gb"] == pytest.approx(one["quantized_weights_gb"] * (1 / n + 2 / layers))
        assert sharded["adapters_gb"] == pytest.approx(one["adapters_gb"] / n)
        assert sharded["grads_and_optimizer_gb"] == pytest.approx(one["grads_and_optimizer_gb"] / n)
        assert sharded["activations_gb"] == pytest.approx(one["activations_gb"])
        assert sharded["prepare_peak_gb"] == pytest.approx(one["svd_workspace_gb"])
        assert sharded["host_weights_gb"] == pytest.approx(one["quantized_weights_gb"] + one["adapters_gb"])
        assert sharded["fsdp"] and not one["fsdp"] and one["host_weights_gb"] == 0
    assert plan_main(["--model", even_ckpt, "--rank", "8", "--num_gpus", "2", "--fsdp", "true"]) == 0


def test_hostile_configs_are_answered_without_allocating(tmp_path, capsys):
    """Widths no machine holds are planned from arithmetic on the meta device (an embedding of 10**13 floats could
    not even be reserved); a depth whose mere module objects would take minutes is refused in one line."""
    import time

    from transformers import LlamaConfig

    from conftest import one_line_error

    wide = LlamaConfig(hidden_size=10**7, intermediate_size=4 * 10**7, num_hidden_layers=2, num_attention_heads=10**5,
                       num_key_value_heads=10**5, vocab_size=10**6)
    start = time.monotonic()
    p = plan(PlanConfig(model="x"), QMiLoRAConfig(rank=8, compute_dtype="bfloat16"), wide)
    h, f, v = 10**7, 4 * 10**7, 10**6
    # 2 layers of 4 h×h attention weights and 3 h×f MLP weights; embeddings and head (untied) unquantized
    assert p["total_params"] == 2 * (4 * h * h + 3 * h * f + 2 * h) + 2 * v * h + h
    assert p["adapter_params"] == 8 * 2 * (4 * 2 * h + 3 * (h + f)) and not p["fits"]
    (tmp_path / "deep").mkdir()
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=10**6, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128).save_pretrained(tmp_path / "deep")
    capsys.readouterr()
    assert plan_main(["--model", str(tmp_path / "deep")]) == 1
    assert "num_hidden_layers 1000000" in one_line_error(capsys, "qmilora-plan")
    assert time.monotonic() - start < 5


def test_tiling_plans_nothing_for_expert_blocks():
    """Mixture-of-experts blocks are not tiled, so the plan counts no saving for them, and QLoRA never tiles."""
    from qmilora import QMiLoRAConfig
    from qmilora.configs import locate

    q = QMiLoRAConfig(rank=16, compute_dtype="bfloat16")
    moe = AutoConfig.from_pretrained(locate("qwen3-30b-a3b", None)[0])
    settings = dict(model="x", max_seq_length=32768, offload_activations=True)
    assert plan(PlanConfig(**settings, tiled_mlp=True), q, moe)["train_peak_gb"] == \
        pytest.approx(plan(PlanConfig(**settings), q, moe)["train_peak_gb"])
    llama3 = AutoConfig.from_pretrained(locate("llama-3-8b", None)[0])
    dense = [plan(PlanConfig(**settings, tiled_mlp=t), q, llama3) for t in (False, True)]
    assert dense[1]["train_peak_gb"] < dense[0]["train_peak_gb"]
    assert dense[1]["qlora_train_peak_gb"] == pytest.approx(dense[0]["qlora_train_peak_gb"])
