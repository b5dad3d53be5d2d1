import pytest

from qmilora import QMiLoRAConfig


def test_defaults():
    c = QMiLoRAConfig()
    assert c.rank == 64 and c.alpha == 64 and c.scaling == 1.0
    # alpha follows rank unless set, also through a copy with another rank (prepare_model's overrides)
    assert QMiLoRAConfig(**{**c.to_dict(), "rank": 8}).alpha == 8
    assert QMiLoRAConfig(**{**QMiLoRAConfig(lora_alpha=32).to_dict(), "rank": 8}).scaling == 4.0
    assert c.target_modules == ["all-linear"] and c.peft_target_modules == "all-linear" and c.quant_type == "nf4" and c.double_quant and c.blocksize == 64
    import torch

    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert c.compute_dtype == ("bfloat16" if cuda_bf16 else "float32")  # holds on a GPU host too
    assert QMiLoRAConfig(rank=8, lora_alpha=16).scaling == 2.0
    assert QMiLoRAConfig(target_modules="q_proj").target_modules == ["q_proj"]


@pytest.mark.parametrize("kw, match", [
    (dict(rank=0), "rank"), (dict(rank=2.5), "rank"), (dict(rank=True), "rank"),
    (dict(lora_alpha=0), "lora_alpha"), (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(target_modules=[]), "target_modules"), (dict(quant_type="int4"), "quant_type"),
    (dict(blocksize=48), "blocksize"), (dict(compute_dtype="float64"), "compute_dtype"),
    (dict(device="gpu0"), "device"), (dict(svd_device="tpu:x"), "svd_device"),
])
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        QMiLoRAConfig(**kw)


def test_cache_key_fields_exclude_placement():
    a = QMiLoRAConfig(rank=8, lora_dropout=0.0, device="cpu").result_fields()
    b = QMiLoRAConfig(rank=8, lora_dropout=0.3, svd_device="cpu").result_fields()
    assert a == b and a != QMiLoRAConfig(rank=8, blocksize=128).result_fields()
