"""FSDP on CPU (gloo, two real processes): 4-bit weights stored as a float dtype shard with the rest, and one sharded
optimizer step gathers back to the single-process step. accelerate runs FSDP on accelerators only; qmilora-train
refuses --fsdp on a CPU instead of falling back to data parallel without a word."""
import os
import subprocess
import sys

import pytest
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from qmilora import QMiLoRAConfig, prepare_model, quantize
from qmilora.cli.train import main

WORKER = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_float_storage_holds_the_same_bytes_and_logits(tiny_ckpt, cache, storage):
    """quant_storage changes the dtype the packed codes are viewed as, nothing else: same bytes, same logits,
    same reload from the cache (whose key it is part of)."""
    plain = prepare_model(tiny_ckpt[0], QMiLoRAConfig(rank=4, cache_dir=cache))
    stored = prepare_model(tiny_ckpt[0], QMiLoRAConfig(rank=4, cache_dir=cache, quant_storage=storage))
    again = prepare_model(tiny_ckpt[0], QMiLoRAConfig(rank=4, cache_dir=cache, quant_storage=storage))
    assert not stored.qmilora_stats.from_cache and again.qmilora_stats.from_cache
    layers = {n: m.weight for n, m in stored.named_modules() if quantize.is_4bit_linear(m)}
    ref = {n: m.weight for n, m in plain.named_modules() if quantize.is_4bit_linear(m)}
    assert layers.keys() == ref.keys() and layers
    for name, w in layers.items():
        assert w.dtype == getattr(torch, storage) and ref[name].dtype == torch.uint8
        assert torch.equal(w.data.reshape(-1).view(torch.uint8)[:ref[name].numel()], ref[name].data.reshape(-1))
    assert stored.config.quantization_config.bnb_4bit_quant_storage == getattr(torch, storage)  # what FSDP reads
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        logits = plain(input_ids=ids).logits
        assert torch.equal(stored(input_ids=ids).logits, logits) and torch.equal(again(input_ids=ids).logits, logits)


@pytest.mark.slow
@pytest.mark.parametrize("version,storage", [("fsdp2", "float32"), ("fsdp1", "float32"), ("fsdp1", "uint8")])
def test_sharded_step_equals_one_process(tiny_llm, tmp_path, cache, version, storage):
    prepare_model(tiny_llm, QMiLoRAConfig(rank=4, lora_dropout=0.0, cache_dir=cache, quant_storage=storage))  # cached
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, tiny_llm,
           cache, str(tmp_path), storage, version]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, start_new_session=True)
    if (version, storage) == ("fsdp1", "uint8"):
        # FSDP1 flattens each unit's parameters into one float tensor: uint8 codes cannot be; the reason for the
        # FSDP-QLoRA recipe's float quant_storage
        assert proc.returncode != 0 and "Cannot flatten integer dtype tensors" in proc.stderr, proc.stderr[-2000:]
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded, single = load_file(tmp_path / "sharded.safetensors"), load_file(tmp_path / "single.safetensors")
    loss = load_file(tmp_path / "loss.safetensors")
    torch.testing.assert_close(loss["sharded"], loss["single"], rtol=1e-6, atol=1e-6)
    # bitsandbytes adds the quant state's companions (absmax, quant_map, ...) from the Params4bit, which a sharded
    # DTensor is not; the adapter (what a run saves) and the codes themselves are all there
    companions = set(single) - set(sharded)
    assert set(sharded) <= set(single) and all(".base_layer.weight." in k for k in companions), sorted(companions)[:3]
    adapters = [k for k in single if "lora_" in k]
    assert adapters
    for k in sharded:
        if "lora_" in k:  # the step moved them, identically up to the order of float additions
            torch.testing.assert_close(sharded[k], single[k], rtol=1e-5, atol=1e-7)
        else:  # frozen: the 4-bit codes (as float32 storage) and everything else, bit for bit
            assert torch.equal(sharded[k], single[k]), k
    # the gathered adapter loads into a fresh preparation and gives the single process's model
    fresh = prepare_model(tiny_llm, QMiLoRAConfig(rank=4, lora_dropout=0.0, cache_dir=cache, quant_storage=storage))
    def adapter(state):
        return {k.replace(".default", ""): v for k, v in state.items() if "lora_" in k}

    assert not set_peft_model_state_dict(fresh, adapter(sharded)).unexpected_keys
    ref = prepare_model(tiny_llm, QMiLoRAConfig(rank=4, lora_dropout=0.0, cache_dir=cache, quant_storage=storage))
    set_peft_model_state_dict(ref, adapter(single))
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_fsdp_on_a_cpu_is_refused_not_run_as_data_parallel(tiny_llm, tmp_path, cache, capsys):
    """accelerate builds no FSDP plugin on a CPU, so Trainer would train unsharded copies (found by hand: --fsdp on
    CPU ran as DDP). One line and a non-zero exit instead, before anything is prepared."""
    out = tmp_path / "run"
    assert main(["--model", tiny_llm, "--output_dir", str(out), "--cache_dir", cache, "--rank", "4",
                 "--max_steps", "1", "--fsdp", "full_shard auto_wrap"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "FSDP" in err[-1] and err[-1].startswith("qmilora-train: error:")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_shipped_fsdp_config_reaches_qmilora(tiny_llm, tmp_path, cache):
    """examples/fsdp.yaml is a valid accelerate FSDP config, and a launch with it is seen as FSDP (accelerate tells
    the processes through the environment, not through --fsdp): on a CPU, the one-line refusal, nothing written."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "fsdp.yaml")
    config = load_config_from_file(path)
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_use_orig_params"] is False
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", path,
                           "--num_processes", "1", "-m", "qmilora.cli.train", "--model", tiny_llm, "--output_dir",
                           str(out), "--cache_dir", cache, "--rank", "4", "--max_steps", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "qmilora-train: error: FSDP needs GPUs" in proc.stderr + proc.stdout
    assert not out.exists()


def test_unknown_quant_storage_is_refused():
    with pytest.raises(ValueError, match="quant_storage must be uint8 or one of"):
        QMiLoRAConfig(quant_storage="int8")
