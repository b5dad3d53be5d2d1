"""Regression tests for the ways a run could silently give a wrong model or lose a user's file (issue 13)."""
import json
import logging
import os
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qmilora import checkpoint, files, prepare_model
from qmilora.cache import Entry
from qmilora.cli.export import main as export_main
from qmilora.cli.inspect import main as inspect_main
from qmilora.cli.train import main as train_main
from qmilora.config import QMiLoRAConfig, QMiLoRAError

from conftest import one_line_error, save_tiny


def shards(d):
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))


def last_block_changed(src, dst):
    """A copy of checkpoint `src` whose only change is one weight of the last block (the first MiB is the same)."""
    shutil.copytree(src, dst)
    for path in shards(dst):
        sd = load_file(path)
        if "model.layers.1.mlp.down_proj.weight" in sd:
            sd["model.layers.1.mlp.down_proj.weight"][0, 0] += 1.0
            save_file(sd, path, metadata={"format": "pt"})
            return str(dst)
    raise AssertionError("weight not found")


def test_identity_covers_every_byte_and_is_memoized(tiny_ckpt, tmp_path, monkeypatch):
    d, _ = tiny_ckpt
    memo = checkpoint.DigestMemo(str(tmp_path / "memo"))
    first = checkpoint.identity(d, checkpoint.shard_files(d), memo)
    other = last_block_changed(d, tmp_path / "other")
    assert checkpoint.identity(other, checkpoint.shard_files(other), memo) != first
    # one flipped byte deep inside the last shard, same size: another identity, though the memo had the file
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    files = checkpoint.shard_files(str(copy))
    same = checkpoint.identity(str(copy), files, memo)
    assert same == first
    with open(files[-1], "r+b") as f:
        f.seek(os.path.getsize(files[-1]) - 3)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    assert checkpoint.identity(str(copy), files, memo) != first
    # a rerun on unchanged files reads no tensor data
    monkeypatch.setattr(checkpoint, "file_digest", lambda p: pytest.fail(f"re-hashed {p}"))
    assert checkpoint.identity(d, checkpoint.shard_files(d), memo) == first


def test_checkpoints_differing_in_one_block_get_their_own_cache_entry(tiny_ckpt, tmp_path, cache):
    d, _ = tiny_ckpt
    other = last_block_changed(d, tmp_path / "other")
    a = prepare_model(d, rank=4, cache_dir=cache)
    b = prepare_model(other, rank=4, cache_dir=cache)
    assert not b.qmilora_stats.from_cache and b.qmilora_source_identity != a.qmilora_source_identity
    again = prepare_model(other, rank=4, cache_dir=cache)
    assert again.qmilora_stats.from_cache and again.qmilora_stats.layers == 14  # the stored statistics come back
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, b(input_ids=ids).logits)
        assert not torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


@pytest.mark.parametrize("damage", ["random_bytes", "truncate", "delete_meta_files"])
def test_damaged_cache_entry_is_rebuilt(tiny_ckpt, cache, damage, caplog):
    d, _ = tiny_ckpt
    ref = prepare_model(d, rank=4, cache_dir=cache)
    (entry,) = [e for e in os.listdir(cache) if e != "digests"]
    path = os.path.join(cache, entry, "base", "model.safetensors")
    size = os.path.getsize(path)
    if damage == "random_bytes":  # same size: only the checksum can tell
        with open(path, "r+b") as f:
            f.seek(size // 2)
            f.write(os.urandom(64))
    elif damage == "truncate":
        os.truncate(path, size // 2)
    else:
        os.remove(os.path.join(cache, entry, "initial_adapter", "adapter_model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="qmilora"):
        again = prepare_model(d, rank=4, cache_dir=cache)
    assert not again.qmilora_stats.from_cache and again.qmilora_stats.decomposed == 14
    assert any("damaged" in r.getMessage() for r in caplog.records)
    assert Entry(cache, entry).problem() is None  # rebuilt in place, verified
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert prepare_model(d, rank=4, cache_dir=cache).qmilora_stats.from_cache


def test_non_finite_checkpoint_tensors_are_refused(tmp_path, cache):
    for name in ("model.norm.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        d = tmp_path / name
        save_tiny(d, shard="10GB")
        sd = load_file(d / "model.safetensors")
        sd[name].view(-1)[3] = float("nan") if "proj" not in name else float("inf")
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(QMiLoRAError, match=f"tensor {name} holds NaN or Inf"):
            prepare_model(str(d), rank=2, cache_dir=cache)


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), 1e300, -1.0, 0.0])
def test_alpha_must_be_finite_and_sane(alpha):
    with pytest.raises(ValueError, match="lora_alpha"):
        QMiLoRAConfig(rank=4, lora_alpha=alpha)


def argv(model, out, cache, *extra):
    return ["--model", model, "--output_dir", str(out), "--cache_dir", cache, "--rank", "4", "--max_steps", "2",
            "--max_seq_length", "48", "--disable_tqdm", "true", "--save_steps", "1", "--logging_steps", "1", *extra]


def test_run_folder_is_never_stale_and_never_overwrites_user_files(tiny_llm, tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert train_main(argv(tiny_llm, out, cache)) == 0
    # a user's folder: refused, README.md untouched
    user = tmp_path / "mine"
    user.mkdir()
    (user / "README.md").write_text("my notes")
    assert train_main(argv(tiny_llm, user, cache)) == 1
    assert "holds no qmilora run" in one_line_error(capsys)
    assert (user / "README.md").read_text() == "my notes" and sorted(os.listdir(user)) == ["README.md"]
    # another model, or another rank, cannot silently continue this run
    other = last_block_changed(tiny_llm, tmp_path / "other_model")
    assert train_main(argv(other, out, cache, "--resume_from_checkpoint", "true")) == 1
    assert "trained on another model" in one_line_error(capsys)
    assert train_main(argv(tiny_llm, out, cache, "--rank", "2", "--resume_from_checkpoint", "true")) == 1
    assert "changes lora_alpha: 4.0 -> 2.0; rank: 4 -> 2" in one_line_error(capsys)
    # a new run over results needs --overwrite_output_dir; then nothing of the old run survives
    assert train_main(argv(other, out, cache, "--rank", "2")) == 1
    assert "earlier run's results" in one_line_error(capsys)
    (out / "notes.txt").write_text("keep")
    assert train_main(argv(other, out, cache, "--rank", "2", "--max_steps", "1", "--overwrite_output_dir", "true")) == 0
    assert json.load(open(out / "initial_adapter" / "adapter_config.json"))["r"] == 2
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-1"]
    assert (out / "notes.txt").read_text() == "keep"
    meta = json.load(open(out / "qmilora.json"))
    assert meta["recipe"]["rank"] == 2 and meta["source"]["path"] == os.path.abspath(other)
    lora = tmp_path / "lora"
    assert export_main(["--adapter", str(out), "--to", "original-lora", "--output", str(lora)]) == 0
    assert json.load(open(lora / "adapter_config.json"))["r"] == 4  # 2r of the new run
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(other), str(lora))  # PEFT accepts it
    # the merged export from the first model's checkpoint is refused: the run was trained on `other`
    assert export_main(["--adapter", str(out), "--to", "merged", "--model", tiny_llm,
                        "--output", str(tmp_path / "m")]) == 1
    assert "content differs" in one_line_error(capsys, "qmilora-export")


def test_final_files_never_replace_files_a_user_added_during_training(tiny_llm, tmp_path, cache, capsys,
                                                                       monkeypatch):
    import qmilora.train

    out = tmp_path / "run"
    real = qmilora.train.RunFolder.finish

    def user_adds_a_readme(self, write_files, meta):
        (out / "README.md").write_text("my notes")  # written while the run trained
        return real(self, write_files, meta)

    monkeypatch.setattr(qmilora.train.RunFolder, "finish", user_adds_a_readme)
    assert train_main(argv(tiny_llm, out, cache)) == 1
    line = one_line_error(capsys)
    assert "README.md, which this run did not write" in line
    assert (out / "README.md").read_text() == "my notes" and not (out / "adapter_model.safetensors").exists()
    kept = [n for n in os.listdir(out) if n.startswith("final-outputs-")]
    assert len(kept) == 1 and (out / kept[0] / "adapter_model.safetensors").exists()
    assert json.load(open(out / "qmilora.json"))["state"] == "training"
    # a completed run's own files are replaced by its continuation without complaint
    monkeypatch.setattr(qmilora.train.RunFolder, "finish", real)
    done = tmp_path / "done"
    assert train_main(argv(tiny_llm, done, cache)) == 0
    assert train_main(argv(tiny_llm, done, cache, "--max_steps", "3", "--resume_from_checkpoint", "true")) == 0


DIVERGE = ("--learning_rate", "1e30", "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--max_grad_norm", "0")


def test_non_finite_loss_stops_training_keeping_the_last_checkpoint(tiny_llm, tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert train_main(argv(tiny_llm, out, cache, "--max_steps", "30", "--save_steps", "1", *DIVERGE)) == 1
    line = one_line_error(capsys)
    assert "the training loss became" in line and "last complete checkpoint" in line and "may have diverged" in line
    assert "start a new run" in line  # not "lower --learning_rate" alone: a resume refuses another learning rate
    assert not (out / "adapter_model.safetensors").exists()
    assert json.load(open(out / "qmilora.json"))["state"] == "training"
    # resuming from a checkpoint whose adapter holds NaN is refused naming the tensor, before any training
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    weights = load_file(last / "adapter_model.safetensors")
    if all(torch.isfinite(t).all() for t in weights.values()):  # diverged to huge but finite: make one NaN
        name = sorted(weights)[0]
        weights[name][0, 0] = float("nan")
        save_file(weights, last / "adapter_model.safetensors")
        record = json.load(open(last / ".complete"))
        record["adapter_model.safetensors"] = [os.path.getsize(last / "adapter_model.safetensors"),
                                               checkpoint.file_digest(str(last / "adapter_model.safetensors"))]
        (last / ".complete").write_text(json.dumps(record))
    assert train_main(argv(tiny_llm, out, cache, "--max_steps", "31", "--save_steps", "1", *DIVERGE,
                           "--resume_from_checkpoint", str(last))) == 1
    line = one_line_error(capsys)
    assert "holds NaN or Inf in" in line and "lora_" in line


def test_a_last_update_that_diverges_is_caught(tiny_llm, tmp_path, cache, capsys):
    """The loss check sees an update only at the next step's forward: the last step's is checked after training. A
    run that fails before its first checkpoint leaves no run record (nothing half-written)."""
    out = tmp_path / "run"
    assert train_main(argv(tiny_llm, out, cache, "--max_steps", "1", "--save_strategy", "no", *DIVERGE)) == 1
    line = one_line_error(capsys)
    assert "training diverged, and no final model was written" in line
    assert json.load(open(out / "qmilora.json"))["state"] == "training"  # the record of what ran stays
    assert not (out / "adapter_model.safetensors").exists()
    # a trained adapter that holds NaN is refused by every command that loads it, naming the tensor
    good = tmp_path / "good"
    assert train_main(argv(tiny_llm, good, cache, "--max_steps", "1")) == 0
    residual = good / "residual_adapter" / "adapter_model.safetensors"
    weights = load_file(residual)
    name = sorted(weights)[0]
    weights[name][0, 0] = float("inf")
    save_file(weights, residual)
    meta = json.load(open(good / "qmilora.json"))  # as if the run had written it: only the values are wrong
    meta["files"]["residual_adapter/adapter_model.safetensors"] = [os.path.getsize(residual),
                                                                   checkpoint.file_digest(str(residual))]
    (good / "qmilora.json").write_text(json.dumps(meta))
    from qmilora.train import load_trained

    with pytest.raises(QMiLoRAError, match=f"holds NaN or Inf in {name}"):
        load_trained(str(good), cache_dir=cache)


def test_rows_whose_prompt_passes_the_check_window(tiny_llm, tmp_path, cache, monkeypatch):
    """The checks before and after training run on windows of the first rows; a prompt longer than the window must
    not make them see no supervised token (a loss over nothing is NaN: a healthy run was called diverged, and the
    chunked loss silently turned off)."""
    import qmilora.checks

    monkeypatch.setattr(qmilora.checks, "CHECK_TOKENS", 16)  # the tiny model has 128 positions, the real window
    data = tmp_path / "long.jsonl"
    words = " ".join(["the"] * 40)
    data.write_text("".join(json.dumps({"instruction": words, "output": "yes it is"}) + "\n" for _ in range(4)))
    out = tmp_path / "run"
    assert train_main(argv(tiny_llm, out, cache, "--data", str(data), "--max_seq_length", "100", "--max_steps", "1",
                           "--save_strategy", "no")) == 0
    assert json.load(open(out / "qmilora.json"))["summary"]["loss"] == "chunked"


def test_a_failed_preparation_leaves_no_run_record(tiny_llm, tmp_path, cache, capsys):
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        assert train_main(argv(tiny_llm, out, cache, "--rank", "4000")) == 1
        assert "too large" in one_line_error(capsys)
        assert out.exists() == (out.name == "empty") and not (out.exists() and os.listdir(out))


@pytest.mark.parametrize("flag, value", [("--learning_rate", "inf"), ("--learning_rate", "-1"), ("--label_smoothing_factor", "2"),
                                         ("--logging_steps", "-1"), ("--max_grad_norm", "-1"),
                                         ("--weight_decay", "-1"), ("--save_total_limit", "-1")])
def test_training_numbers_out_of_range_are_refused(flag, value, tiny_llm, tmp_path, cache, capsys, monkeypatch):
    import qmilora.prepare

    monkeypatch.setattr(qmilora.prepare, "prepare_model", lambda *a, **k: pytest.fail("model loaded"))
    assert train_main(argv(tiny_llm, tmp_path / "run", cache, flag, value)) == 1
    assert flag in one_line_error(capsys)


def test_label_smoothing_uses_the_models_loss(tiny_llm, tmp_path, cache):
    """Trainer's label smoother works on the model's logits; the chunked loss has none and would ignore it."""
    runs = {}
    for name, extra in (("plain", ()), ("smoothed", ("--label_smoothing_factor", "0.1"))):
        assert train_main(argv(tiny_llm, tmp_path / name, cache, "--max_steps", "1", *extra)) == 0
        runs[name] = json.load(open(tmp_path / name / "qmilora.json"))["summary"]
    assert runs["plain"]["loss"] == "chunked" and runs["smoothed"]["loss"] == "model"
    assert runs["smoothed"]["train_loss"] > runs["plain"]["train_loss"]  # smoothing adds the uniform term


def test_the_cache_never_lies_in_the_model_nor_an_output_around_what_a_run_reads(tiny_llm, tmp_path, capsys):
    """Inside the model checkpoint the cache's entries would become part of it; a cache holding the model or the
    data (one scratch folder for everything) is harmless, as it writes only folders of its own."""
    before = sorted(os.listdir(tiny_llm))
    assert train_main(argv(tiny_llm, tmp_path / "r1", os.path.join(tiny_llm, "cache"))) == 1
    assert "choose another --cache_dir" in one_line_error(capsys) and sorted(os.listdir(tiny_llm)) == before
    scratch = tmp_path / "scratch"
    shutil.copytree(tiny_llm, scratch / "model")
    assert train_main(argv(str(scratch / "model"), tmp_path / "r2", str(scratch), "--max_steps", "1")) == 0
    template = tmp_path / "run" / "chat_template.jinja"
    template.parent.mkdir()
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert train_main(argv(tiny_llm, tmp_path / "run", str(tmp_path / "cache"), "--chat_template", str(template),
                           "--overwrite_output_dir", "true")) == 1
    assert "contains the chat template" in one_line_error(capsys) and template.exists()


def test_inspect_never_deletes_an_existing_folder(tiny_ckpt, tmp_path, capsys):
    d, _ = tiny_ckpt
    out = tmp_path / "report"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert inspect_main(["--model", d, "--rank", "4", "--output", str(out)]) == 1
    assert "exists and is not empty" in one_line_error(capsys, "qmilora-inspect")
    assert (out / "thesis.tex").read_text() == "years of work"
    for rank in ("0", "64"):  # 64: too large for every layer
        assert inspect_main(["--model", d, "--rank", rank, "--output", str(tmp_path / "r2")]) == 1
        one_line_error(capsys, "qmilora-inspect")


def test_leftovers_of_killed_writes_are_removed_by_marker_not_by_name(tmp_path):
    from qmilora import files

    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = files.make_temporary(str(tmp_path), "merged")
    with open(os.path.join(stale, files.MARKER), "w") as f:
        json.dump({"pid": dead, "host": __import__("socket").gethostname(), "name": os.path.basename(stale)}, f)
    (tmp_path / "x").write_text("")
    alive = files.make_temporary(str(tmp_path), "merged")  # this process's: still being written
    # a user's files whose names look like old-style temporaries are not qmilora's
    notes = tmp_path / ".notes.old-31999-12-31"
    notes.write_text("keep")
    lookalike = tmp_path / f".merged.tmp-{dead}-abc"
    lookalike.mkdir()
    (lookalike / "mine.txt").write_text("keep")
    with checkpoint.atomic_dir(str(tmp_path / "merged")) as tmp:
        open(os.path.join(tmp, "f"), "w").close()
    assert not os.path.exists(stale) and os.path.exists(alive) and (tmp_path / "merged" / "f").exists()
    assert notes.read_text() == "keep" and (lookalike / "mine.txt").read_text() == "keep"
    assert not (tmp_path / "merged" / files.MARKER).exists()


def test_replacing_an_output_checks_it_again_at_the_rename(tmp_path):
    """An output checked as qmilora's own before a long export may gain a user's file (or appear) while the export
    runs: the rename refuses then, keeping every file, and replaces a folder that is still only qmilora's."""
    out = tmp_path / "out"

    def publish(overwrite, before_rename=lambda: None):
        with files.atomic_dir(str(out), overwrite=overwrite, own_only="--overwrite") as tmp:
            (pathlib.Path(tmp) / "model.bin").write_text("new")
            files.write_manifest(tmp, "test")
            before_rename()

    publish(False)
    files.check_replaceable(str(out))  # what the export checks before its slow part
    with pytest.raises(QMiLoRAError, match="notes.txt, which qmilora did not write.*nothing was replaced"):
        publish(True, lambda: (out / "notes.txt").write_text("keep"))
    assert (out / "notes.txt").read_text() == "keep" and (out / "model.bin").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind
    (out / "notes.txt").unlink()
    with pytest.raises(QMiLoRAError, match="model.bin, which qmilora did not write \\(or which changed since\\)"):
        publish(True, lambda: (out / "model.bin").write_text("edited by the user"))
    assert (out / "model.bin").read_text() == "edited by the user"
    (out / "model.bin").write_text("new")
    publish(True)  # only qmilora's files, as recorded: replaced
    assert sorted(p.name for p in out.iterdir()) == sorted([files.MANIFEST, "model.bin"])
    # without --overwrite only a missing or empty folder is replaced, also one made while the export ran
    other = tmp_path / "other"
    out = other
    publish(False, lambda: other.mkdir())
    assert (other / "model.bin").read_text() == "new"
    with pytest.raises(QMiLoRAError, match="already exists and is not an empty folder; pass --overwrite"):
        publish(False)
    assert (other / "model.bin").read_text() == "new"
    # interrupted while checking (a kill or Ctrl-C while it hashes a large export), or failing at the last rename:
    # the folder and what it holds stay where they were, and no cleanup removes them
    out = other
    (other / "NOTES.md").write_text("mine")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    real_rename = os.rename

    def last_rename_fails(src, dst):
        if dst == str(other) and ".qmilora-replacing-" not in src:
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(files, "foreign", interrupt)
        with pytest.raises(KeyboardInterrupt):
            publish(True)
    assert (other / "NOTES.md").read_text() == "mine"
    (other / "NOTES.md").unlink()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "rename", last_rename_fails)
        with pytest.raises(OSError, match="No space"):
            publish(True)
    assert sorted(p.name for p in other.iterdir()) == sorted([files.MANIFEST, "model.bin"])
    files.remove_stale_temporaries(str(tmp_path))
    assert not [p for p in tmp_path.iterdir() if ".qmilora-" in p.name]
    # a folder to put back whose name was taken again meanwhile goes beside it, never into a temporary
    moved, taken = tmp_path / "moved", tmp_path / "taken"
    for folder in (moved, taken):
        folder.mkdir()
        (folder / "keep.txt").write_text(folder.name)
    kept = files._put_back(str(moved), str(taken))
    assert kept == f"{taken}.kept-{os.getpid()}" and (pathlib.Path(kept) / "keep.txt").read_text() == "moved"


def test_outputs_get_the_users_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with checkpoint.atomic_dir(str(tmp_path / "out")) as tmp:
            open(os.path.join(tmp, "f"), "w").close()
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "out").st_mode & 0o777) == 0o755
    assert (os.stat(tmp_path / "out" / "f").st_mode & 0o777) == 0o644


def test_a_tampered_run_record_cannot_delete_outside_the_folder(tmp_path):
    from qmilora.runfolder import RunFolder

    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    run = tmp_path / "run"
    run.mkdir()
    (run / "loss.png").write_text("old plot")
    record = [len("keep"), checkpoint.file_digest(str(outside))]
    (run / "qmilora.json").write_text(json.dumps({"schema": 3, "state": "complete", "files": {
        "../precious.txt": record, str(outside): record,
        "loss.png": [len("old plot"), checkpoint.file_digest(str(run / "loss.png"))]}}))
    folder = RunFolder(str(run))
    folder.claim(resume=False, overwrite=True)
    folder.begin({"source": {}}, resume=False)
    assert outside.read_text() == "keep" and not (run / "loss.png").exists()
