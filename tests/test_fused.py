"""The fused LoRA-over-4-bit function against PEFT's own bitsandbytes LoRA layer: outputs and gradients equal to
1e-6 (float32), with dropout, under activation checkpointing, and less kept for backward."""
import pytest
import torch

from qmilora import QMiLoRAConfig, prepare_model
from qmilora.interop import use_fused_lora


@pytest.fixture(scope="module")
def model(tiny_ckpt, tmp_path_factory):
    cfg = QMiLoRAConfig(rank=8, lora_alpha=16, lora_dropout=0.25, compute_dtype="float32",
                        cache_dir=str(tmp_path_factory.mktemp("cache")), prepared_cache=False)
    return prepare_model(tiny_ckpt[0], cfg)


def _layers(model):
    from peft.tuners.lora.bnb import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14  # 2 blocks x (q k v o gate up down)
    return layers


def _run(layer, x, g, seed):
    """Output and the gradients of x, A and B for upstream gradient g, dropout drawn from `seed`."""
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    A.grad = B.grad = None
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad, A.grad.clone(), B.grad.clone()


def _close(a, b, tol=1e-6):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("training", [True, False])
def test_equals_peft_layer(model, training, monkeypatch):
    from qmilora import fused as fused_module

    calls = []
    apply = fused_module.LoraOverFrozen.apply
    monkeypatch.setattr(fused_module.LoraOverFrozen, "apply", lambda *a: calls.append(1) or apply(*a))
    model.train(training)
    gen = torch.Generator().manual_seed(0)
    try:
        for layer in _layers(model):
            x = torch.randn(3, 5, layer.in_features, generator=gen)
            g = torch.randn(3, 5, layer.out_features, generator=gen)
            use_fused_lora(layer, False)
            reference = _run(layer, x, g, seed=7)
            assert use_fused_lora(layer) == 1
            fused = _run(layer, x, g, seed=7)
            assert calls, "the fused function did not run"
            calls.clear()
            for name, a, b in zip(("output", "x.grad", "A.grad", "B.grad"), fused, reference):
                assert _close(a, b), (name, (a - b).abs().max().item())
            if training:  # dropout really acted: the same layer without it differs
                layer.lora_dropout["default"].eval()
                plain = _run(layer, x, g, seed=7)
                layer.lora_dropout["default"].train()
                assert not _close(plain[2], reference[2])
    finally:
        use_fused_lora(model, False)
        model.eval()


def test_model_loss_and_gradients_under_checkpointing(model):
    """Whole model, train mode (dropout), activation checkpointing (the recompute draws the same masks)."""
    model.train()
    model.gradient_checkpointing_enable({"use_reentrant": False})
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    results = []
    try:
        for fused in (False, True):
            use_fused_lora(model, fused)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(3)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            results.append((loss.item(), grads))
    finally:
        use_fused_lora(model, False)
        model.gradient_checkpointing_disable()
        model.eval()
    (l0, g0), (l1, g1) = results
    assert abs(l0 - l1) <= 1e-6 * abs(l0)
    assert g0.keys() == g1.keys() and len(g0) == 28
    assert all(_close(g1[n], g0[n], 1e-5) for n in g0), max((g1[n] - g0[n]).abs().max().item() for n in g0)


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while `fn` runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_keeps_less_for_backward(model):
    """q, k and v read one input: PEFT keeps a dropped copy and a mask per layer, the fused function the input
    once, a boolean mask per layer and the r-wide x·Aᵀ."""
    model.train()
    attn = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(4, 64, 64, requires_grad=True)

    def qkv():
        return [proj(x) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]

    try:
        use_fused_lora(model, False)
        peft_bytes = _saved_bytes(qkv)
        use_fused_lora(model)
        fused_bytes = _saved_bytes(qkv)
    finally:
        use_fused_lora(model, False)
        model.eval()
    tokens, width, rank = 4 * 64, 64, 8
    # PEFT: 3 x (dropped float32 copy + bool mask); fused: x once + 3 bool masks (+ small r-wide and weights)
    assert peft_bytes >= 3 * tokens * width * 5
    assert fused_bytes <= tokens * width * 4 + 3 * tokens * width + 3 * tokens * rank * 4 + 64 * 1024
    assert fused_bytes < 0.6 * peft_bytes


def test_other_states_run_peft_forward(model):
    """Merged, adapters disabled and no-grad calls take PEFT's path: the same outputs as PEFT's forward."""
    layer = _layers(model)[0]
    x = torch.randn(2, 3, layer.in_features)
    model.eval()
    try:
        use_fused_lora(model)
        with torch.no_grad():
            assert torch.equal(layer(x), type(layer).forward(layer, x))
        with model.disable_adapter():
            assert torch.equal(layer(x), layer.base_layer(x))
    finally:
        use_fused_lora(model, False)


@pytest.mark.parametrize("cuda_branch", [False, True])
def test_under_autocast_equals_peft_layer(model, monkeypatch, cuda_branch):
    """Mixed precision (the GPU default runs the forward under autocast): the same casts as PEFT's layer, checked
    with CPU autocast in bfloat16. PEFT (and the fused layer, mirroring it) ask `torch.is_autocast_enabled()`,
    which reads CUDA's autocast: cuda_branch makes it answer True, the branch a GPU run takes."""
    if cuda_branch:  # only the argument-less call (CUDA's flag) answers True: torch.autocast itself asks per device
        real = torch.is_autocast_enabled
        monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a, **k: True if not (a or k) else real(*a, **k))
    model.train()
    layer = _layers(model)[4]
    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(2, 7, layer.in_features, generator=gen), torch.randn(2, 7, layer.out_features, generator=gen)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            use_fused_lora(layer, False)
            reference = _run(layer, x, g, seed=5)
            use_fused_lora(layer)
            fused = _run(layer, x, g, seed=5)
    finally:
        use_fused_lora(model, False)
        model.eval()
    for name, a, b in zip(("output", "x.grad", "A.grad", "B.grad"), fused, reference):
        assert a.dtype == b.dtype, name
        assert _close(a.float(), b.float(), 1e-3), (name, (a.float() - b.float()).abs().max().item())
    assert not torch.is_autocast_enabled("cpu")  # the test leaves no autocast behind


def test_lora_bias_and_pickling(model):
    """A layer with PEFT's lora_bias runs PEFT's forward (the fused function has no bias term); a fused model
    pickles and unpickles."""
    import pickle

    layer = _layers(model)[1]
    model.train()
    try:
        use_fused_lora(model)
        x = torch.randn(2, 3, layer.in_features)
        layer.lora_bias["default"] = True
        layer.lora_B["default"].bias = torch.nn.Parameter(torch.randn(layer.out_features))
        outputs = []
        for forward in (layer, lambda x: type(layer).forward(layer, x)):
            torch.manual_seed(0)  # the same dropout masks
            outputs.append(forward(x))
        assert torch.allclose(*outputs)
        del layer.lora_B["default"].bias
        layer.lora_B["default"].bias = None
        layer.lora_bias["default"] = False
        moved = pickle.loads(pickle.dumps(layer))
        assert "forward" in moved.__dict__ and moved.forward.layer is moved
        layer.eval()
        moved.eval()
        torch.testing.assert_close(moved(x), layer(x))
    finally:
        use_fused_lora(model, False)
        model.eval()
