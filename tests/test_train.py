import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qmilora.cli.train import main, parse
from qmilora.config import QMiLoRAError
from qmilora.train import load_trained, train

IDS = torch.tensor([[3, 10, 7, 34, 12, 41, 9, 4]])


def argv(model, out, cache, *extra):
    return ["--model", model, "--output_dir", str(out), "--cache_dir", cache, "--rank", "4",
            "--per_device_train_batch_size", "8", "--max_seq_length", "48", "--logging_steps", "1",
            "--disable_tqdm", "true", "--seed", "7", *extra]


def adapter(out):
    return load_file(os.path.join(out, "adapter_model.safetensors"))


def test_end_to_end_loss_decreases_and_outputs_reload(tiny_llm, tmp_path, cache):
    out = tmp_path / "run"
    model, summary = train(*parse(argv(tiny_llm, out, cache, "--max_steps", "12", "--learning_rate", "5e-3",
                                       "--save_steps", "6", "--val_size", "16")))
    for name in ("adapter_config.json", "adapter_model.safetensors", "initial_adapter/adapter_model.safetensors",
                 "qmilora.json", "tokenizer.json", "loss.png", "checkpoint-12/.complete"):
        assert (out / name).exists(), name
    history = json.load(open(out / "checkpoint-12" / "trainer_state.json"))["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert any("eval_loss" in h for h in history)
    meta = json.load(open(out / "qmilora.json"))
    assert meta["qmilora"]["rank"] == 4 and meta["summary"]["steps"] == 12 and len(meta["source"]["identity"]) == 64 and meta["state"] == "complete"
    assert meta["summary"]["tokens"] > 0 and meta["summary"]["tokens_per_second"] > 0
    # the adapter moved away from its initial value, and the reloaded model computes what the trained one did
    initial = load_file(out / "initial_adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(v, initial[k]) for k, v in adapter(out).items())
    model.eval()
    reloaded = load_trained(str(out), cache_dir=cache).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)


def test_evaluation_during_training_does_not_change_training(tiny_llm, tmp_path, cache):
    """Issue 8: with eval every step (eval-mode no-grad forwards), the adapter ends bit-identical.

    Dropout is off: each eval DataLoader draws its base seed from the global RNG, which would shift the
    dropout masks of later steps; the property under test is the 4-bit layers' training path."""
    common = ("--max_steps", "4", "--learning_rate", "5e-3", "--val_size", "8", "--save_strategy", "no", "--lora_dropout", "0")
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(argv(tiny_llm, a, cache, *common, "--eval_strategy", "steps", "--eval_steps", "1")) == 0
    assert main(argv(tiny_llm, b, cache, *common, "--eval_strategy", "steps", "--eval_steps", "1000")) == 0
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    initial = load_file(a / "initial_adapter" / "adapter_model.safetensors")
    first = [k for k in ta if "layers.0." in k and "lora_A" in k]
    assert first and all(not torch.equal(ta[k], initial[k]) for k in first)  # gradients reached the first layer


def test_yaml_config_and_aliases(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"rank": 4, "learning_rate": 1e-3, "data_format": "chat", "lora_dropout": 0.1}))
    run, q, d, t = parse(["--config", str(cfg), "--lora_r", "8", "--model_name_or_path", "m", "--max_length", "99",
                          "--output_dir", str(tmp_path / "o")])
    assert (run.model, q.rank, q.alpha, q.lora_dropout) == ("m", 8, 8.0, 0.1)
    assert (d.data_format, d.max_seq_length, t.learning_rate) == ("chat", 99, 1e-3)
    expected_optim = "paged_adamw_8bit" if torch.cuda.is_available() else "adamw_torch"  # GPU hosts too
    assert t.activation_checkpointing and t.lr_scheduler_type == "cosine" and t.optim == expected_optim
    bad = tmp_path / "bad.yaml"
    bad.write_text("rnak: 4\n")
    assert main(["--config", str(bad)]) == 1
    # a recipe takes the aliases the command line takes, and transformers' old checkpointing name
    aliases = tmp_path / "aliases.yaml"
    aliases.write_text(yaml.safe_dump({"model_name_or_path": "m", "lora_r": 8, "max_length": 48,
                                       "gradient_checkpointing": False}))
    run, q, d, t = parse(["--config", str(aliases), "--output_dir", str(tmp_path / "o")])
    assert (run.model, q.rank, d.max_seq_length, t.activation_checkpointing) == ("m", 8, 48, False)
    both = tmp_path / "both.yaml"  # transformers' rule: the new name wins
    both.write_text(yaml.safe_dump({"gradient_checkpointing": False, "activation_checkpointing": True,
                                    "max_grad_norm": None}))
    t = parse(["--config", str(both), "--output_dir", str(tmp_path / "o")])[3]
    assert t.activation_checkpointing is True and t.max_grad_norm is None
    twice = tmp_path / "twice.yaml"
    twice.write_text("lora_r: 8\nrank: 4\n")
    with pytest.raises(QMiLoRAError, match="lora_r and rank name the same setting"):
        parse(["--config", str(twice)])


@pytest.mark.parametrize("flags, on", [(["--gradient_checkpointing", "false"], False), (["--no_activation_checkpointing"], False),
                                       (["--activation_checkpointing", "false"], False), ([], True),
                                       (["--gradient_checkpointing", "false", "--activation_checkpointing", "true"], True)])
def test_checkpointing_flags(flags, on, tmp_path, recwarn):
    """transformers' old name (what PEFT and TRL recipes pass) and --no_ work although our default sets the new one;
    the new name wins where both are given (transformers' rule)."""
    t = parse([*flags, "--output_dir", str(tmp_path / "o")])[3]
    assert t.activation_checkpointing is on and t.gradient_checkpointing is on
    assert not [w for w in recwarn if "gradient_checkpointing" in str(w.message)]  # an alias here, not deprecated


def test_bad_inputs_stop_before_the_model_loads(tiny_llm, tmp_path, cache, monkeypatch, capsys):
    import qmilora.prepare

    monkeypatch.setattr(qmilora.prepare, "prepare_model", lambda *a, **k: pytest.fail("model loaded"))
    cases = [("--data", str(tmp_path / "missing.jsonl")), ("--rank", "0"), ("--no_such_flag", "1")]
    for extra in cases:
        assert main(argv(tiny_llm, tmp_path / "o", cache, *extra)) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("qmilora-train: error:"), err
    assert main(["--model", str(tmp_path / "nowhere" / "model"), "--output_dir", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err


KILLER = textwrap.dedent("""
    import os, signal, sys
    import qmilora.train as T
    save = T._Progress.on_save
    def on_save(self, args, state, control, **kw):
        save(self, args, state, control, **kw)
        if state.global_step == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
    T._Progress.on_save = on_save
    from qmilora.cli.train import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_llm, tmp_path, cache):
    common = ("--max_steps", "6", "--save_steps", "2", "--learning_rate", "5e-3")
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(argv(tiny_llm, full, cache, *common)) == 0
    env = {**os.environ, "KILL_AT": "4", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, *argv(tiny_llm, killed, cache, *common)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (killed / "checkpoint-4" / ".complete").exists() and not (killed / "adapter_model.safetensors").exists()
    assert main(argv(tiny_llm, killed, cache, *common, "--resume_from_checkpoint", "true")) == 0
    a, b = adapter(full), adapter(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = lambda d: json.load(open(d / "qmilora.json"))["summary"]  # noqa: E731
    assert summary(full)["steps"] == summary(killed)["steps"] == 6
    last_loss = lambda d: [h["loss"] for h in json.load(open(d / "checkpoint-6" / "trainer_state.json"))["log_history"]  # noqa: E731
                           if h.get("step") == 6 and "loss" in h]
    assert last_loss(full) and last_loss(full) == last_loss(killed)
