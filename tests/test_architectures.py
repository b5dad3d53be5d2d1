"""Every stored layout transformers loads: tiny random checkpoints of many causal-LM families, prepared through
transformers' own loader, checked in float64 (issue 14)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from qmilora import QMiLoRAError, prepare_model
from qmilora.interop import is_conv1d, lora_layers
from qmilora.quantize import dequantize, keep_training_layout, round_trip

from conftest import tiny_tokenizer

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=128, head_dim=16, pad_token_id=0)
EXTRA = {"gptj": {"rotary_dim": 8}, "codegen": {"rotary_dim": 8},
         "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2, "head_dim": None}}
# (family, what makes its layout special); the first ones run in the fast tier
FAST = ["llama", "gpt2", "falcon", "gpt_neox"]
SLOW = ["opt", "phi3", "gemma2", "bloom", "qwen3", "mpt", "gpt_bigcode", "starcoder2", "codegen", "cohere", "gptj",
        "olmo2", "stablelm", "persimmon", "ctrl", "falcon_mamba", "falcon_h1"]  # no checkpointing; PEFT's Mamba rules
RANK, IDS = 4, torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def build(family, directory, **extra):
    kw = {**TINY, **EXTRA.get(family, {}), **extra}
    kw = {k: v for k, v in kw.items() if v is not None}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw)).eval()
    model.save_pretrained(directory, max_shard_size="100KB")
    return model


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def weight_out_in(model, layer):
    module = model.get_submodule(layer)
    return (module.weight.T if is_conv1d(module) else module.weight).detach().double()


def check_family(family, directory, ref, cache):
    with torch.no_grad():
        expected = ref(IDS).logits
    # full precision: output unchanged at init
    plain = prepare_model(directory, rank=RANK, quantize=False, cache_dir=cache)
    with torch.no_grad():
        assert rel(plain(input_ids=IDS).logits, expected) < 1e-5, family
    # 4-bit: every adapter is the r smallest triplets of W (out, in); the base is bitsandbytes' NF4 of W − s·B·A
    model = prepare_model(directory, rank=RANK, cache_dir=cache)
    layers = lora_layers(model)
    assert len(layers) == model.qmilora_stats.decomposed > 0
    for name in sorted(layers)[:3] + sorted(layers)[-2:]:
        layer = layers[name]
        W = weight_out_in(ref, name)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        minor = (U[:, -RANK:] * S[-RANK:]) @ Vh[-RANK:]
        A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        assert rel(layer.scaling["default"] * B @ A, minor) < 1e-5, (family, name)
        residual = W.float() - (layer.scaling["default"] * B @ A).float()
        nf4 = round_trip(residual, quant_type="nf4", blocksize=64, double_quant=True)
        base = dequantize(layer.get_base_layer().weight).float()
        assert rel(base, nf4) < 1e-6, (family, name)
    # logits at init: no further from the fp32 model than QLoRA's (transformers' own 4-bit load), up to NF4's
    # rounding lottery on random weights (measured 0.72-1.09x over 30 families)
    qlora = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, device_map={"": "cpu"},
                                                 quantization_config=BitsAndBytesConfig(
                                                     load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_use_double_quant=True,
                                                     bnb_4bit_compute_dtype=torch.float32))
    # bitsandbytes' AVX512-BF16 inference repack (taken by a no-grad eval forward) asserts on some shapes (Falcon-Mamba's
    # x_proj); the baseline is the same NF4 weights through the plain dequantizing path
    keep_training_layout(qlora)
    with torch.no_grad():
        ours, theirs = rel(model(input_ids=IDS).logits, expected), rel(qlora(IDS).logits, expected)
    assert ours < 1.25 * theirs or (theirs == 0 and ours < 0.3), (family, ours, theirs)
    # one training step: finite, non-zero adapter gradients; nothing else trains
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    return ours, theirs


@pytest.mark.parametrize("family", FAST + [pytest.param(f, marks=pytest.mark.slow) for f in SLOW])
def test_family(family, tmp_path):
    d = tmp_path / family
    ref = build(family, d)
    check_family(family, str(d), ref, str(tmp_path / "cache"))


def test_gpt2_conv1d_is_decomposed_in_out_in_orientation(tmp_path):
    """The stored (in, out) tensor is Wᵀ: decomposing it would give W's minor part transposed (silently wrong)."""
    d = tmp_path / "gpt2"
    ref = build("gpt2", d)
    model = prepare_model(str(d), rank=RANK, target_modules=["attn.c_proj"], quantize=False, cache_dir=str(tmp_path))
    with torch.no_grad():
        assert rel(model(input_ids=IDS).logits, ref(IDS).logits) < 1e-5
    layer = lora_layers(model)["transformer.h.0.attn.c_proj"]
    assert layer.lora_A["default"].weight.shape == (RANK, 64) and layer.lora_B["default"].weight.shape == (64, RANK)


def test_falcon_linear_subclass_is_quantized_and_adapted(tmp_path):
    d = tmp_path / "falcon"
    build("falcon", d)
    model = prepare_model(str(d), rank=RANK, cache_dir=str(tmp_path))
    import bitsandbytes as bnb

    qkv = model.get_base_model().transformer.h[0].self_attention.query_key_value
    assert isinstance(qkv.base_layer, bnb.nn.Linear4bit)  # plain transformers leaves FalconLinear in fp32


def test_hub_layout_renames_are_followed(tmp_path):
    """GPT-NeoX checkpoints on the Hub store the head as `embed_out`; GPT-2 ones lack the `transformer.` prefix."""
    for family, rename in (("gpt_neox", lambda k: k.replace("lm_head.", "embed_out.")),
                           ("gpt2", lambda k: k.removeprefix("transformer."))):
        d = tmp_path / family
        ref = build(family, d, tie_word_embeddings=False)
        for f in [p for p in d.iterdir() if p.suffix == ".safetensors"]:
            save_file({rename(k): v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
        index = d / "model.safetensors.index.json"
        meta = json.load(open(index))
        meta["weight_map"] = {rename(k): v for k, v in meta["weight_map"].items()}
        json.dump(meta, open(index, "w"))
        check_family(family, str(d), ref, str(tmp_path / "cache"))


def test_layer_whose_weight_is_read_directly_is_refused(tmp_path):
    """Mamba multiplies with `dt_proj.weight` instead of calling the layer: 4-bit codes would be used as a matrix
    (transformers' own 4-bit load crashes there) and, unquantized, the adapter would be bypassed without a word."""
    d = tmp_path / "mamba"
    build("mamba", d)
    for quantize in (True, False):
        with pytest.raises(QMiLoRAError, match=r"MambaMixer reads the weight of backbone\.layers\.0\.mixer\.dt_proj "
                                               "directly"):
            prepare_model(str(d), rank=2, quantize=quantize, cache_dir=str(tmp_path / "c"))


def test_weight_changed_in_place_by_the_forward_is_refused(tmp_path):
    """RWKV rescales its output weights in place on an eval-mode forward: an adapter would not be rescaled with them."""
    d = tmp_path / "rwkv"
    build("rwkv", d)
    with pytest.raises(QMiLoRAError, match=r"RwkvForCausalLM changes the weight of rwkv\.blocks\.0\.attention\.output "
                                           "in place"):
        prepare_model(str(d), rank=2, quantize=False, cache_dir=str(tmp_path / "c"))
    with pytest.raises(QMiLoRAError, match=r"the prepared RwkvForCausalLM fails on its first token"):
        prepare_model(str(d), rank=2, cache_dir=str(tmp_path / "c"))  # 4-bit: its rescaling cannot re-set the weight


def test_modules_peft_refuses_are_quantized_without_adapter(tmp_path):
    """PEFT refuses LoRA on Mamba-type models' out_proj: under all-linear it stays 4-bit without adapter, named."""
    d = tmp_path / "fm"
    build("falcon_mamba", d)
    model = prepare_model(str(d), rank=2, cache_dir=str(tmp_path / "c"))
    assert "backbone.layers.0.mixer.out_proj" in model.qmilora_stats.unadaptable
    assert "backbone.layers.0.mixer.out_proj" not in lora_layers(model)
    with pytest.raises(QMiLoRAError, match=r"out_proj cannot carry an adapter: Module 'out_proj' is incompatible"):
        prepare_model(str(d), rank=2, target_modules=["out_proj"], cache_dir=str(tmp_path / "c"))


@pytest.mark.slow
def test_model_without_activation_checkpointing_trains(tmp_path):
    from qmilora.cli.train import main as train_main

    tok = tiny_tokenizer()
    d = tmp_path / "ctrl"
    build("ctrl", d, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    tok.save_pretrained(d)
    assert train_main(["--model", str(d), "--output_dir", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "c"),
                       "--rank", "2", "--max_steps", "2", "--max_seq_length", "32", "--save_strategy", "no",
                       "--disable_tqdm", "true"]) == 0
