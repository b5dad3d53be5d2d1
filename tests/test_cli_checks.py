"""qmilora-eval, -generate, -export and -inspect refuse what cannot give a meaningful result in one line, before the
slow work where they can, and write nothing then: a diverged run (finite weights, NaN outputs), values that mean
nothing, a file passed as a run folder, a moved base checkpoint, a correction rank no layer can hold."""
import gc
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import one_line_error
from qmilora.cli.eval import main as eval_main
from qmilora.cli.export import main as export_main
from qmilora.cli.generate import main as generate_main
from qmilora.cli.inspect import main as inspect_main
from qmilora.files import manifest

RESIDUAL = "residual_adapter/adapter_model.safetensors"


@pytest.fixture(scope="module")
def run(tiny_llm, tmp_path_factory):
    """(a finished run, the cache it was prepared in: this test process's default)."""
    from qmilora.cli.train import main as train_main

    out = tmp_path_factory.mktemp("checks") / "run"
    assert train_main(["--model", tiny_llm, "--output_dir", str(out), "--rank", "4", "--max_steps", "2",
                       "--max_seq_length", "48", "--save_strategy", "no", "--disable_tqdm", "true"]) == 0
    return str(out), os.environ["QMILORA_CACHE"]


def copy_run(run_dir: str, dst, edit_adapter=None, **source) -> str:
    """A copy of the run; `edit_adapter` rewrites its trained adapter's tensors (its recorded digest follows, as
    a diverged run would have written it), `source` changes the recorded source."""
    shutil.copytree(run_dir, dst)
    meta = json.load(open(dst / "qmilora.json"))
    if edit_adapter:
        state = {k: edit_adapter(v) for k, v in load_file(dst / RESIDUAL).items()}
        save_file(state, dst / RESIDUAL, metadata={"format": "pt"})
        meta["files"][RESIDUAL] = manifest(dst / "residual_adapter")["adapter_model.safetensors"]
    meta["source"].update(source)
    json.dump(meta, open(dst / "qmilora.json", "w"))
    return str(dst)


@pytest.fixture(scope="module")
def diverged(run, tmp_path_factory):
    """The run as a learning rate of 1e9 leaves it: every adapter weight ±1e9, finite, and NaN logits."""
    from qmilora.train import load_trained

    path = copy_run(run[0], tmp_path_factory.mktemp("diverged") / "run", lambda v: v.sign() * 1e9)
    model = load_trained(path, lora_dropout=0.0)
    with torch.no_grad():
        assert torch.isnan(model(input_ids=torch.arange(8)[None]).logits).any()
    return path


def test_a_diverged_run_is_refused_and_nothing_is_written(diverged, run, tmp_path, capsys):
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"instruction": "What is 3 + 4?", "output": "3 + 4 = 7."}) + "\n")
    commands = [(export_main, "qmilora-export", ["--to", "merged", "--output", str(tmp_path / "m")]),
                (export_main, "qmilora-export", ["--to", "original-lora", "--output", str(tmp_path / "l")]),
                (export_main, "qmilora-export", ["--to", "original-merged", "--correction_rank", "4",
                                                 "--output", str(tmp_path / "c")]),
                (eval_main, "qmilora-eval", ["--data", str(held)]),
                (generate_main, "qmilora-generate", ["--prompt", "What is 3 + 4?", "--max_new_tokens", "3"])]
    for main, prog, argv in commands:
        assert main(["--adapter", diverged, *argv]) == 1, argv
        line = one_line_error(capsys, prog)  # the captured output is read here: nothing on stdout either
        assert "non-finite outputs (NaN/Inf)" in line and "lower --learning_rate" in line, line
    assert sorted(os.listdir(tmp_path)) == ["held.jsonl"]


def test_an_export_whose_outputs_overflow_is_not_written(run, tmp_path, capsys):
    """Weights of ±30: the trained model (float32) is finite, the same weights in float16 are not."""
    large = copy_run(run[0], tmp_path / "run", lambda v: v.sign() * 30)
    assert export_main(["--adapter", large, "--to", "merged", "--dtype", "float16", "--output",
                        str(tmp_path / "m")]) == 1
    line = one_line_error(capsys, "qmilora-export")
    assert "the merged export gives non-finite outputs (NaN/Inf)" in line and "where the trained model does not" in line
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_eval_prints_valid_json_only():
    from qmilora.cli.eval import perplexity

    assert perplexity(2.0) == pytest.approx(7.389056) and perplexity(800.0) is None


def test_values_that_mean_nothing_are_refused_before_the_run_is_read(tmp_path, capsys):
    nowhere = str(tmp_path / "nowhere")  # read first, this would be the error
    for main, prog, argv, words in [
            (eval_main, "qmilora-eval", ["--data", "x.jsonl", "--batch_size", "0"], "--batch_size must be at least 1"),
            (eval_main, "qmilora-eval", ["--data", "x.jsonl", "--batch_size", "-1"], "--batch_size must be at least 1"),
            (generate_main, "qmilora-generate", ["--prompt", "hi", "--max_new_tokens", "0"],
             "--max_new_tokens must be at least 1"),
            (generate_main, "qmilora-generate", ["--prompt", "hi", "--temperature", "inf"], "positive and finite")]:
        assert main(["--adapter", nowhere, *argv]) == 1
        assert words in one_line_error(capsys, prog), argv


def test_eval_says_what_to_do_when_truncation_leaves_no_response(run, tmp_path, capsys):
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"instruction": "word " * 200, "output": "ok " * 50}) + "\n" for _ in range(2)))
    assert eval_main(["--adapter", run[0], "--data", str(long)]) == 1
    line = one_line_error(capsys, "qmilora-eval")
    assert "max_seq_length=48" in line and "qmilora-eval truncates rows as the run trained" in line, line
    assert "raise --max_seq_length" not in line


def test_a_file_is_no_run_folder(tmp_path, capsys):
    file = tmp_path / "f.txt"
    file.write_text("x")
    for main, prog, argv in [(eval_main, "qmilora-eval", ["--data", "x.jsonl"]),
                             (generate_main, "qmilora-generate", ["--prompt", "hi"]),
                             (export_main, "qmilora-export", ["--to", "merged", "--output", str(tmp_path / "o")])]:
        assert main(["--adapter", str(file), *argv]) == 1
        assert f"--adapter {file} is a file, not a run folder" in one_line_error(capsys, prog)


def test_a_moved_base_checkpoint_points_to_model(run, tiny_llm, tmp_path, capsys):
    moved = copy_run(run[0], tmp_path / "run", path=str(tmp_path / "gone"), model=str(tmp_path / "gone"))
    argv = ["--adapter", moved, "--to", "original-lora", "--measure_rows", "0"]
    assert export_main([*argv, "--output", str(tmp_path / "o")]) == 1
    line = one_line_error(capsys, "qmilora-export")
    assert f"{tmp_path / 'gone'} does not exist" in line and "pass --model PATH with where it is now" in line
    assert export_main([*argv, "--output", str(tmp_path / "o"), "--model", tiny_llm]) == 0
    # eval and generate take --model as export does
    for main, prog, extra in [(eval_main, "qmilora-eval", ["--data", os.path.join(os.path.dirname(__file__), "..",
                                                                                  "examples", "heldout.jsonl")]),
                              (generate_main, "qmilora-generate", ["--prompt", "hi", "--max_new_tokens", "2"])]:
        assert main(["--adapter", moved, *extra]) == 1
        assert "pass --model PATH with where it is now" in one_line_error(capsys, prog)
        assert main(["--adapter", moved, *extra, "--model", tiny_llm]) == 0


def test_a_correction_rank_beyond_every_layer_is_refused_before_loading(run, tmp_path, capsys, monkeypatch):
    import qmilora.train

    def no_load(*args, **kwargs):
        raise AssertionError("the trained model was loaded")

    monkeypatch.setattr(qmilora.train, "load_trained", no_load)
    # the tiny model's widest adapted layers: q_proj, o_proj (32 x 32), gate/up (64 x 32), down (32 x 64)
    for to in ("original-lora", "original-merged"):
        assert export_main(["--adapter", run[0], "--to", to, "--correction_rank", "33",
                            "--output", str(tmp_path / "o")]) == 1
        line = one_line_error(capsys, "qmilora-export")
        assert "--correction_rank 33 is more than the adapted layers can hold" in line
        assert "pass --correction_rank 32 or less" in line
    assert not (tmp_path / "o").exists()


def test_cache_dir_is_where_the_prepared_base_is_read(run, tmp_path, capsys, monkeypatch):
    """--cache_dir means what it means to qmilora-train: the default cache is not touched."""
    default = tmp_path / "default"
    monkeypatch.setenv("QMILORA_CACHE", str(default))
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"instruction": "What is 3 + 4?", "output": "3 + 4 = 7."}) + "\n")
    args = ["--adapter", run[0], "--cache_dir", run[1]]
    assert eval_main([*args, "--data", str(held), "--base", "false"]) == 0
    assert generate_main([*args, "--prompt", "hi", "--max_new_tokens", "2"]) == 0
    assert export_main([*args, "--to", "original-lora", "--correction_rank", "4", "--calibration_rows", "2",
                        "--output", str(tmp_path / "o")]) == 0
    assert export_main([*args, "--to", "merged", "--output", str(tmp_path / "m")]) == 0
    # (the flag table of cli/flags.py may live there: it is no prepared model)
    assert not default.exists() or set(os.listdir(default)) <= {"cli"}
    # the export's output may not lie inside the cache it names
    assert export_main([*args, "--to", "merged", "--output", os.path.join(run[1], "m")]) == 1
    assert "the qmilora cache" in one_line_error(capsys, "qmilora-export")


def test_an_inspect_error_is_the_last_thing_printed(tiny_llm, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llm, broken)
    shards = sorted(f for f in os.listdir(broken) if f.endswith(".safetensors"))
    for name in shards:
        state = load_file(broken / name)
        hit = [k for k in state if "layers.1.mlp" in k]
        if hit:  # a later layer: the progress bar has started
            state[hit[0]][0, 0] = float("nan")
            save_file(state, broken / name, metadata={"format": "pt"})
            break
    assert inspect_main(["--model", str(broken), "--rank", "4", "--output", str(tmp_path / "r"),
                         "--cache_dir", str(tmp_path / "c")]) == 1
    gc.collect()  # a bar left open prints its last state when it is collected (at exit, in the command)
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("qmilora-inspect: error:") and "NaN" in err, err[-500:]
