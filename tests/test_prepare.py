import json
import os

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import qmilora
from qmilora import QMiLoRAConfig, QMiLoRAError, prepare_model
from qmilora.quantize import dequantize, round_trip

from conftest import save_tiny

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_layers(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def test_unquantized_model_output_unchanged_at_init(tiny_ckpt, cache):
    d, ref = tiny_ckpt
    for alpha in (None, 16):
        model = prepare_model(d, QMiLoRAConfig(rank=4, lora_alpha=alpha, quantize=False, cache_dir=cache))
        torch.testing.assert_close(model(input_ids=IDS).logits, ref(IDS).logits, atol=1e-5, rtol=0)
        assert len(lora_layers(model)) == 2 * len(TARGETS)


def test_quantized_layers_and_logits_match_reference(tiny_ckpt, cache):
    d, ref = tiny_ckpt
    cfg = QMiLoRAConfig(rank=4, lora_alpha=8, cache_dir=cache)
    model = prepare_model(d, cfg)
    assert isinstance(model, PeftModel)
    layers = lora_layers(model)
    assert len(layers) == 2 * len(TARGETS)
    expected = LlamaForCausalLM(ref.config).eval()
    expected.load_state_dict(ref.state_dict())
    for name, layer in layers.items():
        assert isinstance(layer, LoraLinear4bit) and isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
        W = ref.get_submodule(name).weight.detach()
        res, A, B = qmilora.minor_split(W, 4, cfg.scaling)
        torch.testing.assert_close(layer.lora_A["default"].weight, A, atol=0, rtol=0)
        torch.testing.assert_close(layer.lora_B["default"].weight, B, atol=0, rtol=0)
        deq = dequantize(layer.get_base_layer().weight)
        nf4 = round_trip(res, quant_type="nf4", blocksize=64, double_quant=True)
        assert torch.equal(deq, nf4), name  # bit-exact: bitsandbytes' own NF4 round trip of the fp32 residual
        expected.get_submodule(name).weight.data = deq + cfg.scaling * B @ A
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected(IDS).logits, atol=1e-5, rtol=1e-5)
        # and quantization did change the model (the test above would pass vacuously otherwise)
        assert (model(input_ids=IDS).logits - ref(IDS).logits).abs().max() > 1e-3


def test_only_adapters_train(tiny_ckpt, cache):
    d, _ = tiny_ckpt
    model = prepare_model(d, rank=4, cache_dir=cache, lora_dropout=0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(input_ids=IDS, labels=IDS).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == trainable


def test_target_list_quantizes_the_rest_plainly(tiny_ckpt, cache):
    d, ref = tiny_ckpt
    model = prepare_model(d, rank=2, target_modules=["q_proj", "v_proj"], cache_dir=cache)
    assert set(lora_layers(model)) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    o = model.get_submodule("base_model.model.model.layers.0.self_attn.o_proj")
    assert isinstance(o, bnb.nn.Linear4bit)
    W = ref.get_submodule("model.layers.0.self_attn.o_proj").weight.detach()
    assert torch.equal(dequantize(o.weight), round_trip(W, quant_type="nf4", blocksize=64, double_quant=True))
    with pytest.raises(QMiLoRAError, match="matches no layer"):
        prepare_model(d, rank=2, target_modules=["qkv"], cache_dir=cache)
    with pytest.raises(QMiLoRAError, match="not a linear layer"):
        prepare_model(d, rank=2, target_modules=["lm_head"], cache_dir=cache)


def test_cache_round_trip_runs_no_svd(tiny_ckpt, cache, monkeypatch):
    d, _ = tiny_ckpt
    first = prepare_model(d, rank=4, cache_dir=cache)
    assert not first.qmilora_stats.from_cache and first.qmilora_stats.decomposed == 14
    entries = [e for e in os.listdir(cache) if e != "digests"]
    assert len(entries) == 1 and not entries[0].startswith(".")
    meta = json.load(open(os.path.join(cache, entries[0], "qmilora.json")))
    assert meta["config"]["rank"] == 4

    def no_svd(*a, **k):
        raise AssertionError("SVD ran on a cache hit")

    import qmilora.decompose

    monkeypatch.setattr(qmilora.decompose, "minor_split", no_svd)
    second = prepare_model(d, rank=4, cache_dir=cache, lora_dropout=0.1)
    assert second.qmilora_stats.from_cache
    assert isinstance(next(iter(lora_layers(second).values())), LoraLinear4bit)
    assert second.peft_config["default"].lora_dropout == 0.1
    with torch.no_grad():
        assert torch.equal(first(input_ids=IDS).logits, second(input_ids=IDS).logits)
    trainable = [n for n, p in second.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(AssertionError, match="SVD ran"):  # a different rank is a different cache entry
        prepare_model(d, rank=2, cache_dir=cache)


def test_loaded_model_input(tiny_ckpt):
    d, ref = tiny_ckpt
    model = prepare_model(ref, rank=4, quantize=False)
    torch.testing.assert_close(model(input_ids=IDS).logits, ref(IDS).logits, atol=1e-5, rtol=0)
    assert torch.equal(ref.model.layers[0].self_attn.q_proj.weight, load_file(
        [os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors")
         and "model.layers.0.self_attn.q_proj.weight" in load_file(os.path.join(d, f))][0])["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(QMiLoRAError, match="PreTrainedModel"):
        prepare_model(torch.nn.Linear(4, 4))


def test_refuses_prequantized(tiny_ckpt, tmp_path, cache):
    d, ref = tiny_ckpt
    # 1) config.json with a quantization_config
    q = tmp_path / "qconfig"
    save_tiny(q)
    cfg = json.load(open(q / "config.json"))
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    json.dump(cfg, open(q / "config.json", "w"))
    with pytest.raises(QMiLoRAError, match="already quantized.*quantization noise"):
        prepare_model(str(q), rank=2, cache_dir=cache)
    # 2) bitsandbytes tensors in the shards
    b = tmp_path / "bnbtensors"
    save_tiny(b, shard="10GB")
    sd = load_file(b / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight.absmax"] = torch.ones(4)
    save_file(sd, b / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QMiLoRAError, match="quantized tensors"):
        prepare_model(str(b), rank=2, cache_dir=cache)
    # 3) integer weights without a tell-tale name
    i = tmp_path / "intweights"
    save_tiny(i, shard="10GB")
    sd = load_file(i / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros_like(sd["model.layers.0.mlp.up_proj.weight"], dtype=torch.int8)
    save_file(sd, i / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QMiLoRAError, match="not floating point"):
        prepare_model(str(i), rank=2, cache_dir=cache)
    # 4) an in-memory model that already has 4-bit layers
    quantized = prepare_model(d, rank=2, cache_dir=cache).get_base_model()
    with pytest.raises(QMiLoRAError, match="already quantized"):
        prepare_model(quantized, rank=2)


def test_bad_sources(tmp_path, cache):
    with pytest.raises(QMiLoRAError, match="does not exist"):
        prepare_model(str(tmp_path / "nope" / "model"), cache_dir=cache)
    with pytest.raises(QMiLoRAError, match="not a local directory nor in the Hugging Face cache, and the Hub cannot be reached"):
        prepare_model("qmilora-test/no-such-model", cache_dir=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(QMiLoRAError, match="no config.json"):
        prepare_model(str(tmp_path / "empty"), cache_dir=cache)
    save_tiny(tmp_path / "pickled")
    for f in os.listdir(tmp_path / "pickled"):
        if "safetensors" in f:
            os.remove(tmp_path / "pickled" / f)
    with pytest.raises(QMiLoRAError, match="no .safetensors"):
        prepare_model(str(tmp_path / "pickled"), cache_dir=cache)


def test_rank_too_large_for_a_layer(tiny_ckpt, cache):
    d, _ = tiny_ckpt
    with pytest.raises(QMiLoRAError, match="rank 64 is too large for every linear layer"):
        prepare_model(d, rank=64, cache_dir=cache)
    # all-linear: layers too small for the rank (k_proj, v_proj are 32 x 64) are quantized without an adapter
    model = prepare_model(d, rank=40, cache_dir=cache)
    small = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "v_proj")}
    assert set(model.qmilora_stats.too_small) == small and "4 layers too small" in model.qmilora_stats.summary()
    every = {f"model.layers.{i}.{kind}.{p}" for i in range(2) for kind, ps in
             (("self_attn", TARGETS[:4]), ("mlp", TARGETS[4:])) for p in ps}
    assert set(lora_layers(model)) == every - small
    for name in small:
        assert isinstance(model.get_base_model().get_submodule(name), bnb.nn.Linear4bit)
    # named explicitly, a layer that is too small is an error, before any SVD
    with pytest.raises(QMiLoRAError, match=r"rank 40 is too large for model.layers.0.self_attn.k_proj \(32x64\)"):
        prepare_model(d, rank=40, target_modules=["k_proj"], cache_dir=cache)


def test_summary_wording():
    from qmilora.prepare import PrepareStats

    assert "3 layers decomposed, kept in full precision" in PrepareStats(decomposed=3).summary()
    line = PrepareStats(layers=5, decomposed=3, calibrated=5).summary()
    assert "5 4-bit layers (3 decomposed, 2 quantized as-is, 5 calibrated)" in line
