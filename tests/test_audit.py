"""The audit table: bad inputs and faults a new user meets, each run through the real CLI.

Every case must exit non-zero with exactly one `qmilora-<verb>: error: ...` line naming the problem, print no
traceback, leave the user's files as they were, and leave no half-written output behind.
"""
from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from qmilora.cli.eval import main as eval_main
from qmilora.cli.export import main as export_main
from qmilora.cli.generate import main as generate_main
from qmilora.cli.inspect import main as inspect_main
from qmilora.cli.plan import main as plan_main
from qmilora.cli.train import main as train_main

MAINS = {"train": train_main, "export": export_main, "generate": generate_main, "eval": eval_main,
         "plan": plan_main, "inspect": inspect_main}
PRECIOUS = "do not lose me"


@pytest.fixture(scope="module")
def ctx(tiny_llm, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("audit_cache"))
    run = str(tmp_path_factory.mktemp("audit_run") / "run")
    assert train_main(["--model", tiny_llm, "--output_dir", run, "--cache_dir", cache, "--rank", "4",
                       "--max_steps", "2", "--max_seq_length", "48", "--save_strategy", "no",
                       "--disable_tqdm", "true"]) == 0
    return SimpleNamespace(llm=tiny_llm, cache=cache, run=run)


# --- builders: each takes (ctx, tmp) and returns a path ------------------------------------------------------------
def ckpt_copy(ctx, tmp, name="ckpt"):
    d = tmp / name
    shutil.copytree(ctx.llm, d)
    return d


def one_shard(d):
    return sorted(p for p in d.iterdir() if p.suffix == ".safetensors")[0]


def mutate_tensor(name, fn):
    def build(ctx, tmp):
        d = ckpt_copy(ctx, tmp)
        for path in sorted(p for p in d.iterdir() if p.suffix == ".safetensors"):
            sd = load_file(path)
            if name in sd:
                sd[name] = fn(sd[name])
                save_file(sd, path, metadata={"format": "pt"})
                return d
        raise AssertionError(name)
    return build


def with_nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def edit_config(**changes):
    def build(ctx, tmp):
        d = ckpt_copy(ctx, tmp)
        cfg = json.load(open(d / "config.json"))
        cfg.update(changes)
        json.dump(cfg, open(d / "config.json", "w"))
        return d
    return build


def shard_bytes(fn):
    def build(ctx, tmp):
        d = ckpt_copy(ctx, tmp)
        path = one_shard(d)
        path.write_bytes(fn(path.read_bytes()))
        return d
    return build


def no_weights(pickles):
    def build(ctx, tmp):
        d = ckpt_copy(ctx, tmp)
        for p in list(d.iterdir()):
            if "safetensors" in p.name:
                p.unlink()
        if pickles:
            (d / "pytorch_model.bin").write_bytes(b"x")
        return d
    return build


def empty_dir(ctx, tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty"


def data_file(name, content: bytes):
    def build(ctx, tmp):
        (tmp / name).write_bytes(content)
        return tmp / name
    return build


def jsonl(*rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def user_dir(ctx, tmp):
    d = tmp / "users_folder"
    d.mkdir()
    (d / "README.md").write_text(PRECIOUS)
    return d


def a_file(ctx, tmp):
    (tmp / "a_file").write_text(PRECIOUS)
    return tmp / "a_file"


def under_a_file(ctx, tmp):
    return a_file(ctx, tmp) / "sub"


def run_copy(edit=None, remove=None):
    def build(ctx, tmp):
        d = tmp / "runcopy"
        shutil.copytree(ctx.run, d)
        if remove:
            os.remove(d / remove)
        if edit is not None:
            meta = json.load(open(d / "qmilora.json"))
            edit(meta)
            json.dump(meta, open(d / "qmilora.json", "w"))
        return d
    return build


def corrupt_meta(ctx, tmp):
    d = run_copy()(ctx, tmp)
    (d / "qmilora.json").write_text("{not json")
    return d


def other_model(ctx, tmp):
    return mutate_tensor("model.layers.1.mlp.down_proj.weight", lambda t: t + 1)(ctx, tmp)


# --- the table -------------------------------------------------------------------------------------------------------
# (id, verb, args: list of strings or builders, expected message fragment)
M, O, C = "{model}", "{out}", "{cache}"
TRAIN = ["--model", M, "--output_dir", O, "--cache_dir", C, "--rank", "4", "--max_steps", "1", "--max_seq_length",
         "48", "--save_strategy", "no", "--disable_tqdm", "true"]
L = "model.layers.0"


def train(*extra, model=None, out=None):
    args = list(TRAIN)
    if model is not None:
        args[1] = model
    if out is not None:
        args[3] = out
    return args + list(extra)


ALPACA_ROW = {"instruction": "Say hi", "output": "hi"}
CASES = [
    # the model
    ("model-missing", "train", train(model="/no/such/model/dir"), "does not exist"),
    ("model-is-file", "train", train(model=a_file), "is a file"),
    ("model-empty-dir", "train", train(model=empty_dir), "no config.json"),
    ("model-no-weights", "train", train(model=no_weights(False)), "no .safetensors"),
    ("model-pickle-only", "train", train(model=no_weights(True)), "only pickle weights"),
    ("shard-0-bytes", "train", train(model=shard_bytes(lambda b: b"")), "not a valid safetensors"),
    ("shard-truncated", "train", train(model=shard_bytes(lambda b: b[: len(b) // 2])), "is truncated"),
    ("shard-garbage-header", "train", train(model=shard_bytes(lambda b: b"\x10" + b"\0" * 7 + b"garbage!" + b[16:])),
     "not a valid safetensors"),
    ("shard-huge-header-length", "train", train(model=shard_bytes(lambda b: b"\xff" * 8 + b[8:])),
     "not a valid safetensors"),
    ("quantized-config", "train", train(model=edit_config(quantization_config={"quant_method": "gptq", "bits": 4})),
     "already quantized"),
    ("int8-weight", "train", train(model=mutate_tensor(f"{L}.mlp.up_proj.weight", lambda t: t.to(torch.int8))),
     "not floating point"),
    ("nan-norm", "train", train(model=mutate_tensor("model.norm.weight", with_nan)), "model.norm.weight holds NaN"),
    ("nan-embedding", "train", train(model=mutate_tensor("model.embed_tokens.weight", with_nan)),
     "model.embed_tokens.weight holds NaN"),
    ("nan-target", "train", train(model=mutate_tensor(f"{L}.self_attn.q_proj.weight", with_nan)),
     "q_proj.weight holds NaN"),
    ("inf-target", "train", train(model=mutate_tensor(f"{L}.mlp.down_proj.weight", lambda t: t * float("inf"))),
     "down_proj.weight holds NaN or Inf"),
    ("shape-mismatch", "train", train(model=edit_config(intermediate_size=48)), "do not belong together"),
    ("shape-mismatch-targets", "train", train("--target_modules", "q_proj", model=edit_config(intermediate_size=48)),
     "do not belong together"),
    ("hub-id-offline", "train", train(model="qmilora-test/no-such-model"), "the Hub cannot be reached"),
    # the data
    ("data-missing", "train", train("--data", "/no/such/data.jsonl"), "does not exist"),
    ("data-empty", "train", train("--data", data_file("e.jsonl", b"")), "is empty"),
    ("data-extension", "train", train("--data", data_file("d.xyz", b"x")), "unsupported extension"),
    ("data-malformed-jsonl", "train", train("--data", data_file("m.jsonl", b'{"instruction": "a",\n')),
     "could not be read"),
    ("data-unknown-fields", "train", train("--data", data_file("u.jsonl", jsonl({"question": "a", "answer": "b"}))),
     "unknown fields"),
    ("data-messages-strings", "train", train("--data", data_file("s.jsonl", jsonl({"messages": ["hi", "there"]}))),
     "row 1"),
    ("data-messages-empty", "train", train("--data", data_file("s2.jsonl", jsonl({"messages": []}))), "row 1"),
    ("data-messages-no-assistant", "train",
     train("--data", data_file("s3.jsonl", jsonl({"messages": [{"role": "user", "content": "hi"}]}))), "no response"),
    ("data-not-utf8", "train", train("--data", data_file("latin.jsonl", '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))),
     "latin.jsonl"),
    ("data-empty-output", "train", train("--data", data_file("o.jsonl", jsonl({"instruction": "a", "output": ""}))),
     "row 1: no response"),
    ("data-number-fields", "train", train("--data", data_file("n.jsonl", jsonl({"instruction": 3, "output": [1]}))),
     "row 1"),
    ("data-csv-missing-column", "train", train("--data", data_file("c.csv", b"instruction,input\na,b\n"),
                                               "--data_format", "alpaca"), "needs field"),
    ("data-bad-format-flag", "train", train("--data_format", "xml"), "data_format"),
    ("data-not-a-dataset", "train", train("--data", "no_such_dataset_name_qmilora"), "neither a file"),
    ("val-size-negative", "train", train("--val_size", "-1"), "val_size"),
    ("val-size-everything", "train", train("--val_size", "0.9999999", "--data",
                                           data_file("two.jsonl", jsonl(ALPACA_ROW, ALPACA_ROW))), "val_size"),
    ("max-seq-length-1", "train", train("--max_seq_length", "1"), "max_seq_length"),
    ("eval-without-split", "train", train("--eval_strategy", "steps"), "no eval split"),
    # decomposition flags
    ("rank-0", "train", train("--rank", "0"), "rank must be a positive integer"),
    ("rank-negative", "train", train("--rank", "-4"), "rank must be a positive integer"),
    ("rank-word", "train", train("--rank", "four"), "--rank"),
    ("rank-too-large", "train", train("--rank", "40"), "too large for"),
    ("lora-r-alias-0", "train", train("--lora_r", "0"), "rank must be"),
    ("alpha-inf", "train", train("--lora_alpha", "inf"), "lora_alpha"),
    ("alpha-nan", "train", train("--lora_alpha", "nan"), "lora_alpha"),
    ("alpha-1e300", "train", train("--lora_alpha", "1e300"), "lora_alpha"),
    ("alpha-negative", "train", train("--lora_alpha", "-8"), "lora_alpha"),
    ("alpha-zero", "train", train("--lora_alpha", "0"), "lora_alpha"),
    ("dropout-1", "train", train("--lora_dropout", "1"), "lora_dropout"),
    ("dropout-negative", "train", train("--lora_dropout", "-0.1"), "lora_dropout"),
    ("target-unknown", "train", train("--target_modules", "qkv"), "matches no layer"),
    ("target-head", "train", train("--target_modules", "lm_head"), "not a linear layer"),
    ("solver-unknown", "train", train("--svd_solver", "lanczos"), "svd_solver"),
    ("quant-type", "train", train("--quant_type", "int8"), "quant_type"),
    ("blocksize", "train", train("--blocksize", "100"), "blocksize"),
    ("compute-dtype", "train", train("--compute_dtype", "float8"), "compute_dtype"),
    ("device-cuda-absent", "train", train("--device", "cuda"), "no CUDA device"),
    ("device-nonsense", "train", train("--device", "tpu9000"), "device"),
    ("svd-device-cuda-absent", "train", train("--svd_device", "cuda:1"), "no CUDA device"),
    ("calibration-samples-0", "train", train("--calibration_data", "bundled", "--calibration_samples", "0"),
     "calibration"),
    ("calibration-without-quantize", "train", train("--calibration_data", "bundled", "--quantize", "false"),
     "calibration_data"),
    ("calibration-file-missing", "train", train("--calibration_data", "/no/such/calib.jsonl"), "calib.jsonl"),
    # the output directory and resuming
    ("output-is-file", "train", train(out=a_file), "is a file"),
    ("output-under-file", "train", train(out=under_a_file), "is a file"),
    ("output-users-folder", "train", train(out=user_dir), "holds no qmilora run"),
    ("resume-nothing", "train", train("--resume_from_checkpoint", "true"), "no complete checkpoint"),
    ("resume-bad-path", "train", train("--resume_from_checkpoint", "/no/such/checkpoint-3"),
     "not a complete qmilora checkpoint"),
    # flags and config files
    ("unknown-flag", "train", train("--no_such_flag", "1"), "unrecognized arguments"),
    ("max-steps-word", "train", train("--max_steps", "many"), "--max_steps"),
    ("yaml-missing", "train", train("--config", "/no/such/config.yaml"), "--config"),
    ("yaml-not-mapping", "train", train("--config", data_file("l.yaml", b"- 1\n- 2\n")), "expected a mapping"),
    ("yaml-unknown-key", "train", train("--config", data_file("k.yaml", b"ranks: 4\n")), "unknown keys"),
    ("yaml-invalid", "train", train("--config", data_file("i.yaml", b"rank: [4\n")), "--config"),
    # export
    ("export-adapter-missing", "export", ["--to", "original-lora", "--adapter", "/no/such/run", "--output", O], "does not exist"),
    ("export-not-a-run", "export", ["--to", "original-lora", "--adapter", user_dir, "--output", O], "no qmilora.json"),
    ("export-corrupt-record", "export", ["--to", "original-lora", "--adapter", corrupt_meta, "--output", O], "unreadable"),
    ("export-old-schema", "export", ["--to", "original-lora", "--adapter", run_copy(lambda m: m.pop("schema")), "--output", O],
     "another qmilora version"),
    ("export-unfinished", "export", ["--to", "original-lora", "--adapter", run_copy(lambda m: m.update(state="training")), "--output", O],
     "unfinished run"),
    ("export-no-adapter-file", "export", ["--to", "original-lora", "--adapter", run_copy(remove="adapter_model.safetensors"), "--output", O],
     "lacks adapter_model.safetensors"),
    ("export-output-not-empty", "export", ["--to", "original-lora", "--adapter", "{run}", "--output", user_dir], "exists and is not empty"),
    ("export-output-is-file", "export", ["--to", "original-lora", "--adapter", "{run}", "--output", a_file], "is a file"),
    ("export-over-its-run", "export", ["--to", "original-lora", "--adapter", run_copy(), "--output", "{built0}", "--overwrite", "true"],
     "is the run directory"),
    ("export-bad-choice", "export", ["--adapter", "{run}", "--output", O, "--to", "gguf"], "invalid choice"),
    ("export-old-name", "export", ["--adapter", "{run}", "--output", O, "--to", "lora"],
     "is now --to original-lora"),
    ("export-other-model", "export", ["--to", "original-lora", "--adapter", "{run}", "--output", O, "--model", other_model], "content differs"),
    ("export-merged-other-model", "export", ["--adapter", "{run}", "--output", O, "--to", "merged", "--model",
                                             other_model], "content differs"),
    ("export-model-missing", "export", ["--to", "original-lora", "--adapter", "{run}", "--output", O, "--model", "/no/such/model/dir"],
     "does not exist"),
    ("export-moved-source", "export", ["--to", "original-lora", "--adapter", run_copy(lambda m: m["source"].update(path="/moved/away")),
                                       "--output", O], "does not exist"),
    # generate / eval
    ("generate-adapter-missing", "generate", ["--adapter", "/no/such/run", "--prompt", "hi"], "does not exist"),
    ("generate-not-a-run", "generate", ["--adapter", user_dir, "--prompt", "hi"], "no qmilora.json"),
    ("generate-no-prompt", "generate", ["--adapter", "{run}"], "--prompt"),
    ("generate-tokens-word", "generate", ["--adapter", "{run}", "--prompt", "hi", "--max_new_tokens", "x"],
     "--max_new_tokens"),
    ("eval-adapter-missing", "eval", ["--adapter", "/no/such/run", "--data", "x.jsonl"], "does not exist"),
    ("eval-data-missing", "eval", ["--adapter", "{run}", "--data", "/no/such/held.jsonl"], "does not exist"),
    ("eval-data-malformed", "eval", ["--adapter", "{run}", "--data", data_file("h.jsonl", b"{oops\n")],
     "could not be read"),
    # plan
    ("plan-rank-negative", "plan", ["--model", M, "--rank", "-64"], "rank must be a positive integer"),
    ("plan-rank-0", "plan", ["--model", M, "--rank", "0"], "rank must be a positive integer"),
    ("plan-rank-too-large", "plan", ["--model", M, "--rank", "4096"], "too large for"),
    ("plan-gpu-memory-word", "plan", ["--model", M, "--gpu_memory", "lots"], "memory size"),
    ("plan-gpu-memory-negative", "plan", ["--model", M, "--gpu_memory=-5GB"], "memory size"),
    ("plan-seq-0", "plan", ["--model", M, "--max_seq_length", "0"], "max_seq_length"),
    ("plan-batch-0", "plan", ["--model", M, "--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
    ("plan-blocksize", "plan", ["--model", M, "--blocksize", "3"], "blocksize"),
    ("plan-target-unknown", "plan", ["--model", M, "--target_modules", "qkv"], "matches no layer"),
    ("plan-model-missing", "plan", ["--model", "/no/such/model/dir"], "does not exist"),
    ("plan-model-empty", "plan", ["--model", empty_dir], "no config.json"),
    ("plan-quantized", "plan", ["--model", edit_config(quantization_config={"quant_method": "awq"})],
     "already quantized"),
    # inspect
    ("inspect-rank-0", "inspect", ["--model", M, "--rank", "0", "--output", O], "rank must be a positive integer"),
    ("inspect-rank-too-large", "inspect", ["--model", M, "--rank", "40", "--output", O], "too large for"),
    ("inspect-output-not-empty", "inspect", ["--model", M, "--rank", "2", "--output", user_dir],
     "exists and is not empty"),
    ("inspect-output-is-file", "inspect", ["--model", M, "--rank", "2", "--output", a_file], "is a file"),
    ("inspect-model-missing", "inspect", ["--model", "/no/such/model/dir", "--output", O], "does not exist"),
    ("inspect-model-empty", "inspect", ["--model", empty_dir, "--output", O], "no config.json"),
    ("inspect-target-unknown", "inspect", ["--model", M, "--target_modules", "qkv", "--output", O],
     "matches no layer"),
    ("inspect-quantized", "inspect", ["--model", edit_config(quantization_config={"quant_method": "gptq"}),
                                      "--output", O], "already quantized"),
]


def snapshot(root):
    """Every file under `root` with its bytes (what a case must not change, beside its own outputs)."""
    found = {}
    for folder, _, names in os.walk(root):
        for n in names:
            p = os.path.join(folder, n)
            with open(p, "rb") as f:
                found[p] = f.read()
    return found


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_loses_nothing(case, ctx, tmp_path, capsys):
    name, verb, spec, message = case
    built = []

    def resolve(a):
        if callable(a):
            built.append(str(a(ctx, tmp_path)))
            return built[-1]
        return a.format(model=ctx.llm, out=str(tmp_path / "out"), cache=ctx.cache, run=ctx.run,
                        built0=built[0] if built else "")

    argv = [resolve(a) for a in spec]
    before = snapshot(tmp_path) | snapshot(ctx.run)
    capsys.readouterr()
    try:
        rc = MAINS[verb](argv)
    except SystemExit as exit_:
        rc = exit_.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"qmilora-{verb}: error:")]
    assert rc not in (0, None), (name, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    assert len(errors) == 1 and message in errors[0], (name, err[-2000:])
    after = snapshot(tmp_path) | snapshot(ctx.run)
    changed = [p for p, b in before.items() if after.get(p) != b]
    assert not changed, f"{name} changed or removed {changed}"
    new = [p for p in after if p not in before]
    assert all(os.path.basename(p) == "qmilora.json" and "/out/" in p for p in new), new  # at most a run record
    leftovers = [n for _, dirs, files in os.walk(tmp_path) for n in dirs + files if ".tmp-" in n or ".old-" in n]
    assert not leftovers, leftovers


def test_one_entry_point(ctx, capsys):
    from qmilora.cli.main import main

    assert main(["nope"]) == 2
    assert capsys.readouterr().err.strip() == ("qmilora: error: unknown command 'nope'; choose one of train, export, "
                                               "generate, eval, plan, inspect")
    assert main(["plan", "--model", ctx.llm, "--rank", "4"]) == 0
    assert "trainable parameters" in capsys.readouterr().out
    assert main(["plan", "--model", ctx.llm, "--rank", "0"]) == 1
    assert capsys.readouterr().err.startswith("qmilora-plan: error: rank must be a positive integer")


def test_interrupt_and_unexpected_errors_are_one_line(ctx, tmp_path, capsys, monkeypatch):
    import qmilora.prepare

    out = str(tmp_path / "out")
    argv = [a.format(model=ctx.llm, out=out, cache=str(tmp_path / "cache")) for a in TRAIN]  # no cache hit
    for exc, code, fragment in ((KeyboardInterrupt(), 130, "interrupted"),
                                (RuntimeError("boom\nsecond line"), 1, "unexpected RuntimeError: boom second line"),
                                (torch.OutOfMemoryError("CUDA out of memory"), 1, "out of memory")):
        def fail(*a, _exc=exc, **k):
            raise _exc

        monkeypatch.setattr(qmilora.prepare, "_load", fail)
        assert train_main(argv) == code
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qmilora-train")]
        assert len(err) == 1 and fragment in err[0], err
    monkeypatch.setenv("QMILORA_DEBUG", "1")
    monkeypatch.setattr(qmilora.prepare, "_load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        train_main(argv)


def test_disk_full_is_refused_before_writing(ctx, tmp_path, capsys, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10, 10, 0))
    cache = str(tmp_path / "cache")
    argv = [a.format(model=ctx.llm, out=str(tmp_path / "out"), cache=cache) for a in TRAIN]
    assert train_main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qmilora-train")]
    assert len(err) == 1 and "not enough disk space for the prepared-model cache entry" in err[0]
    assert [n for n in os.listdir(cache) if n != "digests"] == []
    assert export_main(["--adapter", ctx.run, "--to", "merged", "--output", str(tmp_path / "m")]) == 1
    assert "not enough disk space for the merged model" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
