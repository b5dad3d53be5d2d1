"""Issue 8: 4-bit layers must keep passing gradients after an eval-mode forward (bitsandbytes CPU repacking)."""
import bitsandbytes as bnb
import torch

from qmilora import prepare_model
from qmilora.quantize import dequantize, is_cpu_packed

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def base_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_eval_forward_then_train_keeps_exact_input_gradients(tiny_ckpt, cache):
    d, _ = tiny_ckpt
    model = prepare_model(d, rank=4, cache_dir=cache, lora_dropout=0.0)
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)  # the call that repacks weights on AVX512-BF16 CPUs without the fix
    model.train()
    layers = base_layers(model)
    assert len(layers) == 14
    for name, layer in layers:
        assert not is_cpu_packed(layer.weight), name
        x = torch.randn(3, 5, layer.in_features, requires_grad=True, generator=torch.Generator().manual_seed(2))
        layer(x).square().sum().backward()
        x_ref = x.detach().clone().requires_grad_(True)
        (x_ref @ dequantize(layer.weight).T).square().sum().backward()
        assert x.grad is not None, name
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


def test_generate_then_train_gives_gradients_to_the_first_layer(tiny_ckpt, cache):
    d, _ = tiny_ckpt
    model = prepare_model(d, rank=4, cache_dir=cache, lora_dropout=0.0)
    model.eval()
    model.generate(input_ids=IDS[:1, :4], max_new_tokens=3, do_sample=False)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    first = [p.grad for n, p in model.named_parameters() if "layers.0." in n and "lora_" in n]
    assert len(first) == 14
    assert all(g is not None and torch.isfinite(g).all() for g in first)
    assert all(g.abs().sum() > 0 for g in first)
