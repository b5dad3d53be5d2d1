"""Where "auto" runs the float64 minor solver: the model's device, except on a GPU whose float64 the host's cores
beat (consumer GPUs run float64 at 1/32-1/64 of float32), decided by timing both once."""
import logging

import torch

from qmilora import QMiLoRAConfig, cpu, prepare_model


def test_a_cpu_model_solves_on_the_cpu_without_probing(monkeypatch):
    monkeypatch.setattr(cpu, "_probe_seconds", lambda *a: (_ for _ in ()).throw(AssertionError("probed")))
    assert cpu.solver_device(torch.device("cpu"), 2) == (torch.device("cpu"), "the model's device")


def test_a_gpu_slow_at_float64_hands_the_solver_to_the_cpu(monkeypatch):
    gpu = torch.device("cuda", 0)
    for gpu_s, host_s, expected in ((4.0, 1.0, torch.device("cpu")), (0.2, 1.0, gpu)):
        monkeypatch.setattr(cpu, "_probe_seconds", lambda device, *a: gpu_s if device.startswith("cuda") else host_s)
        chosen, why = cpu.solver_device(gpu, 8)
        assert chosen == expected
        assert f"{max(gpu_s, host_s) / min(gpu_s, host_s):.1f}x faster" in why


def test_the_probe_times_the_real_solver(monkeypatch):
    """The probe runs the solver itself (here on the CPU, with the run's threads) and returns its time."""
    from qmilora import decompose

    calls = []
    real = decompose.minor_split
    monkeypatch.setattr(decompose, "minor_split", lambda w, r, **kw: calls.append((tuple(w.shape), kw)) or real(w, r, **kw))
    cpu._probe_seconds.cache_clear()
    seconds = cpu._probe_seconds("cpu", 1, "gram", 8)
    assert seconds > 0 and calls[-1] == (cpu.PROBE_SHAPE, {"solver": "gram", "threads": 1})


def test_preparation_uses_the_chosen_device(tiny_ckpt, cache, monkeypatch, caplog):
    """prepare_model asks `solver_device` under "auto" (and logs why); an explicit --svd_device is not second-guessed."""
    asked = []
    monkeypatch.setattr(cpu, "solver_device", lambda device, threads, solver, rank: asked.append((device, solver, rank))
                        or (device, "because"))
    with caplog.at_level(logging.INFO, logger="qmilora"):
        prepare_model(tiny_ckpt[0], QMiLoRAConfig(rank=4, cache_dir=cache, prepared_cache=False))
    assert asked == [(torch.device("cpu"), "auto", 4)] and "SVDs on cpu: because" in caplog.text
    prepare_model(tiny_ckpt[0], QMiLoRAConfig(rank=4, cache_dir=cache, prepared_cache=False, svd_device="cpu"))
    assert len(asked) == 1
