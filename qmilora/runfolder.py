"""A qmilora-train output directory: the one owner of its layout and of qmilora.json's schema.

    qmilora.json                                     schema 2: state (preparing → training → complete), the source
                                                     (path, content identity), the recipe (every field that changes
                                                     the prepared model), all configs, the summary, versions, files
    adapter_config.json, adapter_model.safetensors   the trained adapter (PEFT format)
    initial_adapter/                                 the minor factors at init (export needs them)
    tokenizer files, loss.png, README.md             (README.md is PEFT's model card)
    checkpoint-N/                                    Trainer's checkpoints; one counts once it holds `.complete`

A run writes only into a new or empty directory, or into a folder of its own earlier run: resuming checks that the
source and recipe are the ones recorded; a new run over earlier results needs `overwrite`, and then removes only
what the earlier run wrote. Every file lands under a temporary name first.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

from . import checkpoint
from .config import QMiLoRAError

SCHEMA = 2
META, INITIAL, COMPLETE = "qmilora.json", "initial_adapter", ".complete"
ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
RESIDUAL = "residual_adapter"  # the adapter as trained, for the NF4 residual base (the top-level one: original base)
_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


class RunFolder:
    def __init__(self, path: str):
        self.path = path
        self.meta_path = os.path.join(path, META)
        self.initial = os.path.join(path, INITIAL)

    # --- reading -------------------------------------------------------------------------------------------------
    def meta(self) -> dict | None:
        try:
            with open(self.meta_path) as f:
                meta = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise QMiLoRAError(f"{self.meta_path} is unreadable ({err}); it is not a usable qmilora run") from None
        if not isinstance(meta, dict):
            raise QMiLoRAError(f"{self.meta_path} is not a qmilora run record")
        return meta

    def read_complete(self) -> dict:
        """The record of a finished run, checked for every file export, eval and generate need."""
        if not os.path.isdir(self.path):
            raise QMiLoRAError(f"{self.path} does not exist (expected a qmilora-train output directory)")
        meta = self.meta()
        if meta is None:
            raise QMiLoRAError(f"{self.path} has no {META}: it is not a qmilora-train output directory")
        if meta.get("schema") != SCHEMA:
            raise QMiLoRAError(f"{self.path} was written by another qmilora version (run record schema "
                               f"{meta.get('schema', 1)}, this one reads {SCHEMA}); train it again")
        if meta.get("state") != "complete":
            raise QMiLoRAError(f"{self.path} holds an unfinished run (state {meta.get('state')!r}); resume it with "
                               "--resume_from_checkpoint true, or use one of its checkpoint-N folders' runs")
        for rel in (ADAPTER_FILE, ADAPTER_CONFIG, os.path.join(INITIAL, ADAPTER_FILE)):
            if not os.path.isfile(os.path.join(self.path, rel)):
                raise QMiLoRAError(f"{self.path} lacks {rel}")
        return meta

    def residual_adapter(self) -> str:
        """The folder of the adapter as trained (on the residual base): residual_adapter/, or the run folder itself
        for runs written before it existed (their top-level adapter was that one)."""
        sub = os.path.join(self.path, RESIDUAL)
        return sub if os.path.isfile(os.path.join(sub, ADAPTER_FILE)) else self.path

    def checkpoints(self) -> list[str]:
        if not os.path.isdir(self.path):
            return []
        return [n for n in os.listdir(self.path) if _CHECKPOINT.match(n)]

    def last_complete_checkpoint(self) -> str | None:
        """The newest checkpoint-N written to the end (a run killed mid-save leaves one without the marker)."""
        done = [n for n in self.checkpoints() if os.path.isfile(os.path.join(self.path, n, COMPLETE))]
        return os.path.join(self.path, max(done, key=lambda n: int(_CHECKPOINT.match(n)[1]))) if done else None

    def resolve_resume(self, value: str | None) -> str | None:
        if value in (None, "", "false", "False"):
            return None
        if value in ("true", "True", "last"):
            found = self.last_complete_checkpoint()
            if found is None:
                raise QMiLoRAError(f"--resume_from_checkpoint {value}: no complete checkpoint in {self.path}")
            return found
        if not os.path.isfile(os.path.join(value, COMPLETE)):
            raise QMiLoRAError(f"--resume_from_checkpoint {value}: not a complete qmilora checkpoint directory")
        if os.path.abspath(os.path.dirname(os.path.normpath(value))) != os.path.abspath(self.path):
            raise QMiLoRAError(f"--resume_from_checkpoint {value}: the checkpoint is not in --output_dir {self.path}")
        return value

    # --- writing -------------------------------------------------------------------------------------------------
    def claim(self, *, resume: bool, overwrite: bool) -> None:
        """Check, before any preparation, that this run may write here; refuse with one line otherwise."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise QMiLoRAError(f"--output_dir {self.path} is a file, not a directory")
        checkpoint.check_writable(self.path)
        if not os.path.isdir(self.path):
            return
        checkpoint.remove_stale_temporaries(self.path)
        entries = [n for n in os.listdir(self.path)]
        if not entries:
            return
        meta = self.meta()
        if meta is None:
            raise QMiLoRAError(f"--output_dir {self.path} is not empty and holds no qmilora run; qmilora never "
                               "writes over files it did not create: choose a new or empty directory")
        if resume:
            return
        if (self.checkpoints() or meta.get("state") == "complete") and not overwrite:
            raise QMiLoRAError(f"--output_dir {self.path} holds an earlier run's results; resume it with "
                               "--resume_from_checkpoint true, or pass --overwrite_output_dir to replace them")

    def check_resume(self, checkpoint_dir: str, source_identity: str, recipe: dict) -> None:
        """A checkpoint continues only the run it belongs to: same source content, same decomposition."""
        meta = self.meta() or {}
        if meta.get("schema") != SCHEMA or "recipe" not in meta:
            raise QMiLoRAError(f"cannot resume from {checkpoint_dir}: {self.path} has no run record of this qmilora "
                               "version")
        if meta["source"].get("identity") != source_identity:
            raise QMiLoRAError(f"cannot resume from {checkpoint_dir}: it was trained on another model "
                               f"({meta['source'].get('path')}); pass that --model, or start a new run")
        changed = sorted(k for k in set(recipe) | set(meta["recipe"]) if recipe.get(k) != meta["recipe"].get(k))
        if changed:
            was = ", ".join(f"{k}={meta['recipe'].get(k)!r}" for k in changed)
            now = ", ".join(f"{k}={recipe.get(k)!r}" for k in changed)
            raise QMiLoRAError(f"cannot resume from {checkpoint_dir}: it was trained with {was}; this run has {now}")

    def begin(self, meta: dict, *, resume: bool) -> None:
        """Record the run as started; a new run first removes what an earlier run wrote here (claim allowed it)."""
        os.makedirs(self.path, exist_ok=True)
        if not resume:
            old = self.meta() or {}
            for name in set(old.get("files", [])) | set(self.checkpoints()) | {INITIAL}:
                if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
                    continue  # the record names entries of this folder only; anything else is not ours to remove
                path = os.path.join(self.path, name)
                shutil.rmtree(path) if os.path.isdir(path) else (os.path.exists(path) and os.remove(path))
        # a resumed run keeps the record of the files an earlier completion wrote: its own to replace
        kept = {"files": (self.meta() or {}).get("files", [])} if resume else {}
        self.write_meta({**meta, **kept, "schema": SCHEMA, "state": "training" if resume else "preparing"})

    def write_meta(self, meta: dict) -> None:
        checkpoint.write_atomic(self.meta_path, json.dumps(meta, indent=2, default=str).encode())

    def update(self, **fields) -> dict:
        meta = {**(self.meta() or {}), **fields}
        self.write_meta(meta)
        return meta

    def write_initial(self, model) -> None:
        """The minor factors at init, from this run's preparation (kept on resume: the recipe was verified equal)."""
        if os.path.isdir(self.initial):
            return
        with checkpoint.atomic_dir(self.initial) as tmp:
            model.save_pretrained(tmp)

    def mark_complete_checkpoint(self, step: int) -> None:
        path = os.path.join(self.path, f"checkpoint-{step}")
        if os.path.isdir(path):
            open(os.path.join(path, COMPLETE), "w").close()

    def finish(self, write_files, meta: dict) -> None:
        """`write_files(tmp)` writes the final files; they replace this run's earlier ones; qmilora.json goes last,
        marking the run complete only once the adapter beside it is final."""
        checkpoint.remove_stale_temporaries(self.path)
        ours = set((self.meta() or {}).get("files") or [])  # what an earlier, completed run of this folder wrote
        tmp = tempfile.mkdtemp(dir=self.path, prefix=f".final{checkpoint._TMP}{os.getpid()}-")
        try:
            write_files(tmp)
            names = sorted(os.listdir(tmp))
            foreign = [n for n in names if n not in ours and os.path.lexists(os.path.join(self.path, n))]
            if foreign:  # someone put these here while the run trained: never replace them
                kept = os.path.join(self.path, f"final-outputs-{os.getpid()}")
                os.rename(tmp, kept)
                raise QMiLoRAError(f"{self.path} now holds {', '.join(foreign)}, which this run did not write; it "
                                   f"replaced nothing: the trained adapter and the other final files are in {kept} "
                                   "(move them into place, or your files away and resume with "
                                   "--resume_from_checkpoint true)")
            for name in names:
                dest = os.path.join(self.path, name)
                if os.path.isdir(dest):
                    shutil.rmtree(dest)
                os.replace(os.path.join(tmp, name), dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.write_meta({**meta, "schema": SCHEMA, "state": "complete", "files": names + [INITIAL]})
