"""Tiled position-wise blocks: the decoder's MLPs (found by a check, not by name) computed over the sequence in
tiles give the same loss and gradients, and keep one tile's activations instead of the whole sequence's."""
import pytest
import torch

from qmilora import QMiLoRAConfig, prepare_model
from qmilora.tiled import tile_position_wise, untile


@pytest.fixture(scope="module")
def model(tiny_ckpt, tmp_path_factory):
    cfg = QMiLoRAConfig(rank=8, lora_dropout=0.0, compute_dtype="float32",
                        cache_dir=str(tmp_path_factory.mktemp("cache")), prepared_cache=False)
    return prepare_model(tiny_ckpt[0], cfg)


def test_finds_the_mlps_only(model):
    try:
        names = tile_position_wise(model, tokens=3)
    finally:
        assert untile(model) == len(names)
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]  # not attention, not the norms (no linear layers)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_same_loss_and_gradients(model, checkpointing):
    ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(0))
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    try:
        reference = _loss_and_grads(model, ids)
        assert len(tile_position_wise(model, tokens=4)) == 2  # 13 tokens: tiles of 4, 4, 4 and 1
        tiled = _loss_and_grads(model, ids)
    finally:
        untile(model)
        model.gradient_checkpointing_disable()
        model.eval()
    assert abs(tiled[0] - reference[0]) <= 1e-6 * abs(reference[0])
    assert tiled[1].keys() == reference[1].keys()
    for name, grad in reference[1].items():
        torch.testing.assert_close(tiled[1][name], grad, rtol=1e-5, atol=1e-7)


def test_keeps_one_tile(model):
    """What autograd keeps from an MLP's forward: the input only, against every intermediate of every token."""
    mlp = model.base_model.model.model.layers[0].mlp
    x = torch.randn(1, 64, 64, requires_grad=True)
    seen = {}

    def saved(fn):
        seen.clear()

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn().sum().backward()
        return sum(seen.values())

    model.train()
    try:
        whole = saved(lambda: mlp(x))
        tile_position_wise(model, tokens=16)
        tiled = saved(lambda: mlp(x))
    finally:
        untile(model)
        model.eval()
    intermediate = 96  # the tiny model's MLP width
    assert whole >= 3 * 64 * intermediate * 4  # gate, up and their product for 64 tokens, float32
    assert tiled <= 64 * 64 * 4 + 64 * 1024  # the input (the tiles are views of it), and small tensors


def test_no_gradients_runs_the_block_whole(model):
    mlp = model.base_model.model.model.layers[0].mlp
    x = torch.randn(1, 10, 64)
    try:
        tile_position_wise(model, tokens=4)
        with torch.no_grad():
            out = mlp(x)
        assert torch.equal(out, type(mlp).forward(mlp, x))
    finally:
        untile(model)


def test_qmilora_train_tiled_logs_the_same_losses(tiny_llm, tmp_path, cache, monkeypatch):
    """Through qmilora-train (packing, gradient accumulation, checkpointing): the same losses and adapter."""
    import json

    from safetensors.torch import load_file
    from test_train import argv

    from qmilora import tiled
    from qmilora.cli.train import main

    used = []
    original = tiled.tile_position_wise
    monkeypatch.setattr(tiled, "tile_position_wise", lambda m: used.extend(original(m, tokens=8)) or used)
    common = ("--max_steps", "3", "--learning_rate", "5e-3", "--lora_dropout", "0", "--gradient_accumulation_steps",
              "2", "--save_steps", "3")
    plain, tiled_run = tmp_path / "plain", tmp_path / "tiled"
    assert main(argv(tiny_llm, plain, cache, *common)) == 0
    assert main(argv(tiny_llm, tiled_run, cache, *common, "--tiled_mlp", "true")) == 0
    assert len(used) == 2

    def losses(out):
        state = json.load(open(out / "checkpoint-3" / "trainer_state.json"))
        return [h["loss"] for h in state["log_history"] if "loss" in h]

    assert len(losses(plain)) == 3 and losses(tiled_run) == pytest.approx(losses(plain), rel=1e-5)
    a, b = load_file(tiled_run / "adapter_model.safetensors"), load_file(plain / "adapter_model.safetensors")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    summary = json.load(open(tiled_run / "qmilora.json"))["summary"]
    assert summary["tiled_mlp"] is True and summary["packing"] is True


def test_mixture_of_experts_blocks_stay_whole(tmp_path):
    """Expert blocks (stacks, routers whose outputs feed the auxiliary loss) are not tiled; the dense MLPs of the
    same model's other layers would be."""
    from test_moe import build

    d = tmp_path / "moe"
    build("qwen3_moe", d)
    moe = prepare_model(str(d), rank=4, cache_dir=str(tmp_path / "c"))
    assert tile_position_wise(moe, tokens=4) == []
