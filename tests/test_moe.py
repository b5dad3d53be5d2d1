"""Mixture-of-experts models (issue 14): every expert's matrix split on its own, the residual stacks stored in 4 bits,
only routed experts dequantized, PEFT's parameter LoRA for the adapters. Float64 checks against the checkpoint."""
import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qmilora import QMiLoRAConfig, QMiLoRAError, prepare_model, quantize
from qmilora.experts import lora_layers as stack_layers
from qmilora.interop import lora_layers

from conftest import tiny_tokenizer, train_and_export

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=128, head_dim=16, pad_token_id=0)
MOE = dict(num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
# family: config extras; comments say what its layout adds
FAMILIES = {
    "qwen3_moe": MOE,  # Hub layout: experts stored apart, fused on load
    "mixtral": MOE,  # w1/w3/w2 per expert
    "gpt_oss": MOE,  # (experts, in, out) stacks with biases
    "qwen2_moe": {**MOE, "shared_expert_intermediate_size": 64},  # + a shared expert and its Linear(h, 1) gate
    "olmoe": MOE, "granitemoe": MOE, "granitemoeshared": MOE, "flex_olmo": MOE, "minimax": MOE,
    "phimoe": MOE,  # router: an nn.Linear subclass that routes in its forward
    "hunyuan_v1_moe": MOE,  # router: a plain Linear(h, experts)
    "deepseek_v2": {**MOE, "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 16},  # a dense first layer, shared experts
    "deepseek_v3": {**MOE, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "kv_lora_rank": 16,
                    "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
                    "head_dim": None, "rope_interleave": False},
    "glm4_moe": {**MOE, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1},
    "ernie4_5_moe": MOE, "exaone_moe": MOE, "afmoe": MOE, "cohere2_moe": MOE, "solar_open": MOE,
    "dots1": {**MOE, "n_shared_experts": 1},
    "lfm2_moe": {**MOE, "layer_types": ["full_attention", "conv"], "num_dense_layers": 1},  # + a convolution
    "qwen3_next": {**MOE, "layer_types": ["linear_attention", "full_attention"]},  # + linear attention's conv
}
RANK, IDS = 4, torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def build(family, directory, fused=False, **extra):
    torch.manual_seed(0)
    kw = {k: v for k, v in {**TINY, **FAMILIES[family], **extra}.items() if v is not None}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw)).eval()
    model.save_pretrained(directory, max_shard_size="100KB")  # transformers' own save: its Hub layout
    if fused:  # the layout the model holds (experts fused), which transformers loads as well
        from safetensors.torch import save_file

        for f in directory.glob("*.safetensors*"):
            f.unlink()
        (directory / "model.safetensors.index.json").unlink(missing_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors",
                  metadata={"format": "pt"})
    return model


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def stacks_of(model):
    """{full name: (experts, out, in) float64} of the reference model's expert stacks."""
    out = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() == 3 and not isinstance(module, torch.nn.modules.conv._ConvNd):
                w = p.detach().double()
                out[f"{name}.{pname}"] = w.transpose(1, 2) if module.is_transposed else w
    return out


def nf4_everything(ref):
    """QLoRA's rounding applied to every linear weight and expert stack (transformers' own 4-bit load leaves expert
    stacks in full precision, so it is no fair reference for a 4-bit MoE)."""
    model = copy.deepcopy(ref)
    head = model.get_output_embeddings()
    kw = dict(quant_type="nf4", blocksize=64, double_quant=True)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                module.weight.copy_(quantize.round_trip(module.weight.float(), **kw))
            for p in module.parameters(recurse=False):
                if p.dim() == 3 and not isinstance(module, torch.nn.modules.conv._ConvNd):
                    p.copy_(quantize.round_trip(p.float(), **kw))
    return model


def test_expert_dequantization_reads_one_expert_bit_exactly():
    torch.manual_seed(0)
    for double_quant in (True, False):
        stack = torch.randn(7, 128, 96)  # 192 absmax per expert: 8-bit absmax blocks of 256 straddle experts
        param = quantize.quantize_experts(stack, quant_type="nf4", blocksize=64, double_quant=double_quant,
                                          out_dtype=torch.float32)
        whole = quantize.dequantize(param)
        assert torch.equal(whole, quantize.round_trip(stack, quant_type="nf4", blocksize=64, double_quant=double_quant))
        for e in range(7):
            assert torch.equal(quantize.dequantize_expert(param, e), whole[e])
    with pytest.raises(ValueError, match="whole number of 64-blocks"):
        quantize.quantize_experts(torch.randn(2, 10, 10), quant_type="nf4", blocksize=64, double_quant=True,
                                  out_dtype=torch.float32)


def check_family(family, directory, ref, cache):
    with torch.no_grad():
        expected = ref(IDS).logits
    plain = prepare_model(directory, rank=RANK, quantize=False, cache_dir=cache)
    with torch.no_grad():
        assert rel(plain(input_ids=IDS).logits, expected) < 1e-5, family
    model = prepare_model(directory, rank=RANK, cache_dir=cache)
    stats = model.qmilora_stats
    reference = stacks_of(ref)
    assert stats.expert_stacks == stats.stacks_decomposed == len(reference) > 0
    assert stats.routers and all("experts." not in r for r in stats.routers)
    layers = stack_layers(model)
    assert set(layers) == set(reference)
    for name, layer in layers.items():
        A, B, s = layer.factors("default")
        W = reference[name]
        param = getattr(layer.get_base_layer(), layer.parameter_name)
        assert quantize.is_4bit_param(param) and not param.requires_grad
        residual = []
        for e in range(W.shape[0]):
            U, S, Vh = torch.linalg.svd(W[e], full_matrices=False)
            minor = (U[:, -RANK:] * S[-RANK:]) @ Vh[-RANK:]  # the r smallest triplets of expert e
            delta = s * B[e].double() @ A[e].double()
            assert rel(delta, minor) < 1e-5, (family, name, e)
            residual.append(W[e].float() - delta.float())
        nf4 = quantize.round_trip(torch.stack(residual), quant_type="nf4", blocksize=64, double_quant=True)
        assert rel(quantize.dequantize(param).float(), nf4) < 1e-6, (family, name)
    # routers stay in the compute dtype, unadapted
    for router in stats.routers:
        p = model.get_base_model().get_parameter(router)
        assert not quantize.is_4bit_param(p) and not p.requires_grad
    # every other linear layer is 4-bit; those PEFT would re-target are named
    assert all(quantize.is_4bit_linear(model.get_base_model().get_submodule(n)) for n in stats.unadaptable)
    # logits at init: no further off than QLoRA's rounding of the same weights (experts included)
    with torch.no_grad():
        ours, theirs = rel(model(input_ids=IDS).logits, expected), rel(nf4_everything(ref)(IDS).logits, expected)
    assert ours < 1.25 * theirs, (family, ours, theirs)
    # one training step: finite, non-zero gradients on every adapter, nothing else trains
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values()), family
    assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if "experts" in n), family
    return ours, theirs


@pytest.mark.parametrize("family", ["qwen3_moe"] + [pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES
                                                    if f != "qwen3_moe"])
def test_moe_family(family, tmp_path):
    d = tmp_path / family
    ref = build(family, d)
    check_family(family, str(d), ref, str(tmp_path / "cache"))


@pytest.mark.slow
def test_fused_save_layout(tmp_path):
    d = tmp_path / "fused"
    ref = build("qwen3_moe", d, fused=True)
    check_family("qwen3_moe", str(d), ref, str(tmp_path / "cache"))


def test_only_routed_experts_are_dequantized(tmp_path, monkeypatch):
    d = tmp_path / "m"
    build("qwen3_moe", d)
    model = prepare_model(str(d), rank=RANK, cache_dir=str(tmp_path / "c")).eval()
    import qmilora.experts as experts_module

    read, whole = [], []
    real = quantize.dequantize_expert
    monkeypatch.setattr(experts_module.quantize, "dequantize_expert", lambda p, e: read.append(e) or real(p, e))
    monkeypatch.setattr(experts_module.quantize, "dequantize", lambda p: whole.append(p))
    with torch.no_grad():
        model(input_ids=IDS[:1, :1])  # one token: top-2 of 4 experts in each of 2 layers, 2 stacks each
    assert len(read) == 2 * 2 * 2 and not whole


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])  # gpt_oss: (experts, in, out) stacks with biases
def test_training_batches_take_the_grouped_forward_with_the_eager_result(family, tmp_path, monkeypatch):
    """At least as many routed pairs as experts: each stack is dequantized once and transformers' grouped forward
    runs; logits and every adapter gradient equal the per-expert eager path's."""
    import qmilora.experts as experts_module

    d = tmp_path / "m"
    build(family, d)
    model = prepare_model(str(d), rank=RANK, cache_dir=str(tmp_path / "c")).train()

    def step():
        model.zero_grad()
        out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    whole, real = [], quantize.dequantize
    monkeypatch.setattr(experts_module.quantize, "dequantize", lambda p: whole.append(p) or real(p))
    built, stack = [], experts_module.whole_stack
    monkeypatch.setattr(experts_module, "whole_stack", lambda m, p, lora: built.append(lora) or stack(m, p, lora))
    logits, grads = step()
    assert len(whole) == 2 * 2 * 2  # 2 layers x 2 stacks, once each in the forward and in checkpointing's recompute
    assert len(built) == 8 and built == [None] * 8  # the adapters run on the routed tokens: no B·A stack is built
    monkeypatch.setattr(experts_module, "count", lambda stack: 10**9)  # never enough pairs: the eager path
    eager_logits, eager_grads = step()
    assert len(whole) == 8 and rel(logits, eager_logits) < 1e-5
    assert set(grads) == set(eager_grads) and any("experts" in n for n in grads)
    for n, g in grads.items():
        assert rel(g, eager_grads[n]) < 1e-4, n


def test_grouped_forward_only_where_torch_grouped_gemm_takes_the_dtype():
    """torch's grouped GEMM takes only bfloat16 on CUDA, and transformers' grouped forward does not check: float16 or
    float32 weights on a GPU keep the per-expert eager path; the CPU kernel takes any float dtype."""
    from qmilora.experts import dtype_of, grouped_gemm_takes

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert grouped_gemm_takes(cuda, torch.bfloat16)
    assert not grouped_gemm_takes(cuda, torch.float16) and not grouped_gemm_takes(cuda, torch.float32)
    assert all(grouped_gemm_takes(cpu, d) for d in (torch.float32, torch.bfloat16, torch.float16))
    param = quantize.quantize_experts(torch.randn(2, 64, 32), quant_type="nf4", blocksize=64, double_quant=True,
                                      out_dtype=torch.float16)
    assert dtype_of(param) == torch.float16 and dtype_of(torch.zeros(2, 3, 4, dtype=torch.bfloat16)) == torch.bfloat16


def test_router_is_not_adapted_even_where_peft_would(tmp_path):
    """PEFT resolves "all-linear" on Qwen3-MoE/Mixtral-like models to their routers too (its transformers-v4
    compatibility); QMiLoRA passes the resolved names so routers stay unadapted."""
    d = tmp_path / "m"
    build("qwen3_moe", d)
    model = prepare_model(str(d), rank=RANK, cache_dir=str(tmp_path / "c"))
    assert not any(".gate." in n or n.endswith(".gate") for n in {**lora_layers(model), **stack_layers(model)})
    assert model.peft_config["default"].lora_dropout == 0  # plain PEFT loads expert adapters only without dropout


def test_layers_peft_would_retarget_are_quantized_without_adapter(tmp_path):
    """On GLM-4-MoE (and DeepSeek, ERNIE, ...) PEFT rewrites any LoRA target named gate_proj/up_proj/down_proj into an
    expert-parameter target, for adapters written against transformers v4: a dense MLP's adapter would be dropped
    or loaded onto the experts. Those layers are quantized without adapter and named; asked for by name, refused."""
    d = tmp_path / "glm"
    build("glm4_moe", d, **FAMILIES["glm4_moe"])
    model = prepare_model(str(d), rank=RANK, cache_dir=str(tmp_path / "c"))
    blocked = model.qmilora_stats.unadaptable
    assert "model.layers.0.mlp.down_proj" in blocked and not set(blocked) & set(lora_layers(model))
    assert "PEFT does not adapt them" in model.qmilora_stats.summary()
    with pytest.raises(QMiLoRAError, match=r"mlp\.down_proj cannot carry an adapter: PEFT reads a LoRA target named .down_proj. on glm4_moe"):
        prepare_model(str(d), rank=RANK, target_modules=["q_proj", "down_proj"], cache_dir=str(tmp_path / "c"))


def test_linear_routers_stay_full_precision(tmp_path):
    import bitsandbytes as bnb

    for family in ("hunyuan_v1_moe", "phimoe"):
        d = tmp_path / family
        build(family, d)
        model = prepare_model(str(d), rank=2, cache_dir=str(tmp_path / "c"))
        routers = [m for n, m in model.get_base_model().named_modules()
                   if isinstance(m, torch.nn.Linear) and getattr(m, "out_features", 0) == 4]
        assert routers and not any(isinstance(m, bnb.nn.Linear4bit) for m in routers), family
        assert not any(isinstance(m.weight, bnb.nn.Params4bit) or m.weight.requires_grad for m in routers), family


def test_named_experts_target_and_rank_check(tmp_path):
    d = tmp_path / "m"
    build("qwen3_moe", d)
    model = prepare_model(str(d), rank=RANK, target_modules=["q_proj", "experts"], cache_dir=str(tmp_path / "c"))
    assert len(stack_layers(model)) == 4 and len(lora_layers(model)) == 2
    with pytest.raises(QMiLoRAError, match=r"rank 32 is too large for .*experts\.down_proj \(64x32\)"):
        prepare_model(str(d), rank=32, target_modules=["experts"], cache_dir=str(tmp_path / "c"))
    # under all-linear a stack too small for the rank is quantized without adapter and named, never a crash
    model = prepare_model(str(d), rank=32, cache_dir=str(tmp_path / "c"))
    assert sorted(stack_layers(model)) == [f"model.layers.{i}.mlp.experts.gate_up_proj" for i in (0, 1)]
    assert "model.layers.0.mlp.experts.down_proj" in model.qmilora_stats.too_small
    (down,) = [p for n, p in model.named_parameters() if "layers.0.mlp.experts" in n and n.endswith(".down_proj")]
    assert quantize.is_4bit_param(down)
    model(input_ids=IDS, labels=IDS).loss.backward()


def test_undeclared_expert_layout_is_refused_by_name(tmp_path):
    """JetMoE keeps 3-D expert weights in modules transformers' experts interface does not route (no declared
    layout): refused naming the layer type, never left in full precision without a word."""
    d = tmp_path / "jetmoe"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "jetmoe", hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16, intermediate_size=64,
        vocab_size=128, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)).save_pretrained(d)
    with pytest.raises(QMiLoRAError, match=r"is a 3-D parameter of JetMoe\w+, whose layout transformers does not declare"):
        prepare_model(str(d), rank=RANK, cache_dir=str(tmp_path / "c"))
    from qmilora.cli.plan import main as plan_main  # the plan refuses it too

    assert plan_main(["--model", str(d), "--rank", str(RANK)]) == 1


def test_plan_weight_bytes_match_a_prepared_moe(tmp_path):
    from qmilora.plan import PlanConfig, count, plan

    d = tmp_path / "m"
    build("qwen3_moe", d, hidden_size=128, moe_intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
          head_dim=32)  # every weight fills whole blocks of 256 absmax values
    hf = AutoConfig.from_pretrained(d)
    qcfg = QMiLoRAConfig(rank=RANK, compute_dtype="float32", cache_dir=str(tmp_path / "c"))
    model = prepare_model(str(d), qcfg)

    def state_bytes(qs):
        tensors = [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code, qs.offset] if qs.nested else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    four_bit = [p for p in model.parameters() if quantize.is_4bit_param(p)]
    packed = sum(p.numel() * p.element_size() + state_bytes(p.quant_state) for p in four_bit)
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if "lora_" not in n and not quantize.is_4bit_param(p))
    p = plan(PlanConfig(model=str(d)), qcfg, hf)
    constants = len(four_bit) * (16 + 256 + 1) * 4  # per quantized tensor: code tables and offset
    assert p["quantized_weights_gb"] * 2**30 == pytest.approx(packed + other - constants, abs=1)
    c = count(hf, ["all-linear"], RANK)
    assert RANK * c["adapter_in_out"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert c["num_experts"] == 4 and c["top_k"] == 2
    assert c["active_params"] == c["total_params"] - c["experts"] + 2 * 2 * (128 * 128 + 128 * 64)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "glm4_moe"])  # Hub layout; (E, in, out); PEFT's re-targeting
def test_moe_train_export_and_reload(tmp_path, family):
    """Train through the CLI, export both ways: --to merged equals the original base plus the exported LoRA loaded
    by plain PEFT; the trained adapter reloads onto a fresh preparation."""
    tok = tiny_tokenizer()
    d = tmp_path / "moe"
    build(family, d, vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
          pad_token_id=tok.pad_token_id)
    tok.save_pretrained(d)
    a, b, c, ids, out = train_and_export(tmp_path, d, tok)
    assert rel(a, b) < 1e-5 and rel(a, c) > 1e-3  # trained: it moved, and both exports agree
    # the run's adapter on a fresh 4-bit preparation: training is reproduced up to NF4 (same as the run's model)
    fresh = prepare_model(str(d), rank=4, cache_dir=str(tmp_path / "c"))
    fresh.load_adapter(str(out / "residual_adapter"), adapter_name="trained", is_trainable=False)
    fresh.set_adapter("trained")
    from qmilora.train import load_trained

    reloaded = load_trained(str(out)).eval()  # what qmilora-generate / -eval use
    with torch.no_grad():
        ours = reloaded(input_ids=ids).logits
        assert rel(fresh(input_ids=ids).logits, ours) < 1e-6
        assert rel(ours, a) < 0.3  # the 4-bit model against the full-precision merge: NF4's error only


def test_inspect_reports_every_expert(tmp_path):
    import json

    from qmilora.cli.inspect import main as inspect_main

    d = tmp_path / "m"
    build("qwen3_moe", d)
    assert inspect_main(["--model", str(d), "--rank", str(RANK), "--output", str(tmp_path / "r"),
                         "--cache_dir", str(tmp_path / "c")]) == 0
    names = [w["layer"] for w in json.load(open(tmp_path / "r" / "report.json"))["weights"]]
    assert len(names) == 8 + 2 * 2 * 4  # 8 attention projections, 2 layers x 2 stacks x 4 experts
    assert "model.layers.1.mlp.experts.down_proj.3" in names


def test_bad_expert_stacks_are_refused_in_one_line(tmp_path):
    """A NaN in an expert stack is named by its own parameter; experts that fill no whole quantization blocks are
    refused before any SVD."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "nan"
    build("qwen3_moe", d, fused=True)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.1.mlp.experts.down_proj"][2, 0, 0] = float("nan")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QMiLoRAError, match=r"^checkpoint tensor model\.layers\.1\.mlp\.experts\.down_proj holds NaN"):
        prepare_model(str(d), rank=RANK, cache_dir=str(tmp_path / "c"))
    with pytest.raises(QMiLoRAError, match=r"experts\.down_proj holds 64x32 weights, not a whole number of "
                                           r"--blocksize 4096 blocks"):
        prepare_model(str(d), rank=RANK, blocksize=4096, cache_dir=str(tmp_path / "c"))


def test_a_forward_that_uses_the_whole_stack_gets_it_dequantized():
    """`_Weights` stands in for an expert parameter in the eager forward: indexing reads one expert, anything else
    (e.g. one bmm over all experts) gets the whole stack, adapter included, in the module's own layout."""
    from qmilora.experts import _Weights

    torch.manual_seed(0)
    stack = torch.randn(3, 64, 32)  # (experts, out, in)
    module = torch.nn.Module()
    module.is_transposed = True  # the module holds (experts, in, out)
    A, B = torch.randn(3, 2, 32), torch.randn(3, 64, 2)
    param = quantize.quantize_experts(stack, quant_type="nf4", blocksize=64, double_quant=True, out_dtype=torch.float32)
    weights = _Weights(module, "w", param, (A, B, 0.5))
    expected = (quantize.dequantize(param) + 0.5 * B @ A).transpose(1, 2)
    assert torch.allclose(weights[1], expected[1], atol=1e-6)
    assert weights.shape == (3, 32, 64)
    assert torch.allclose(weights.transpose(1, 2), expected.transpose(1, 2), atol=1e-6)
