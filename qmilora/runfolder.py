"""A qmilora-train output directory: the one owner of its layout and of qmilora.json's schema.

    qmilora.json                                     schema 3: state (preparing → training → complete), the source
                                                     (path, content identity), the recipe (every field that changes
                                                     the prepared model), the resume recipe (training, data and
                                                     tokenizer), all configs, the summary, versions, and `files`:
                                                     every file the run wrote, with size and sha256
    adapter_config.json, adapter_model.safetensors   the trained adapter (PEFT format)
    initial_adapter/                                 the minor factors at init (export needs them)
    tokenizer files, loss.png, README.md             (README.md is PEFT's model card)
    checkpoint-N/                                    Trainer's checkpoints; `.started` is written before Trainer
                                                     writes one, `.complete` (its files' sizes and digests) once
                                                     Trainer has written all of it; only complete ones resume
    .qmilora.lock                                    held by the training process (pid, host)

A run writes only into a new or empty directory, or into a folder of its own earlier run: resuming checks that the
source and the whole recipe are the ones recorded; a new run over earlier results needs `overwrite`, and then removes
only the files the earlier run recorded, each still holding its recorded bytes. Anything else in the folder that
would be removed or overwritten (a file a user put into a checkpoint, a checkpoint-N that no qmilora run wrote, a
symlink) stops the run in one line before anything is removed. Every file lands under a temporary name first.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time

from . import checkpoint, files
from .config import QMiLoRAError

SCHEMA = 3
READABLE = (2, 3)  # a schema-2 run (no digests) can be read and exported, not replaced
META, INITIAL, COMPLETE, STARTED, LOCK = "qmilora.json", "initial_adapter", ".complete", ".started", ".qmilora.lock"
ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
RESIDUAL = "residual_adapter"  # the adapter as trained, for the NF4 residual base (the top-level one: original base)
_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
# what the final write puts at the top of a run folder (besides what it recorded earlier): a file of the user's under
# one of these names is refused before training, not after it
FINAL_NAMES = {ADAPTER_FILE, ADAPTER_CONFIG, "README.md", "loss.png", RESIDUAL, *checkpoint.TOKENIZER_FILES}


class RunFolder:
    def __init__(self, path: str):
        self.path = path
        self.meta_path = os.path.join(path, META)
        self.initial = os.path.join(path, INITIAL)
        self.fresh = False  # this process began a new run here (`begin`): its record is its own to discard

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
        if meta.get("schema") not in READABLE:
            raise QMiLoRAError(f"{self.path} was written by another qmilora version (run record schema "
                               f"{meta.get('schema', 1)}, this one reads {SCHEMA}); train it again")
        if meta.get("state") != "complete":
            raise QMiLoRAError(f"{self.path} holds an unfinished run (state {meta.get('state')!r}); resume it with "
                               "qmilora-train --resume_from_checkpoint true: a finished run writes the model this reads")
        for rel in (ADAPTER_FILE, ADAPTER_CONFIG, os.path.join(INITIAL, ADAPTER_FILE)):
            if not os.path.isfile(os.path.join(self.path, rel)):
                raise QMiLoRAError(f"{self.path} lacks {rel}")
        for key in ("source", "qmilora", "recipe", "data"):
            if not isinstance(meta.get(key), dict):
                raise QMiLoRAError(f"{self.meta_path} lacks its {key!r} record: it was edited or damaged; train again")
        recorded = meta.get("files") if isinstance(meta.get("files"), dict) else {}
        changed = [rel for rel, rec in recorded.items() if _plain_relative(rel)
                   and not files.matches(os.path.join(self.path, rel), rec)]
        if changed:
            raise QMiLoRAError(f"{self.path}: {', '.join(sorted(changed)[:3])} changed since the run wrote it (its "
                               "size or sha256 differs from the run record); restore it, or train again")
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

    def checkpoint_record(self, name: str) -> dict | None:
        """The files a complete checkpoint holds ({relative path: [size, sha256]}), or None if it is not one."""
        try:
            with open(os.path.join(self.path, name, COMPLETE)) as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record else None

    def last_complete_checkpoint(self) -> str | None:
        """The newest checkpoint-N written to the end (a run killed mid-save leaves one without the marker)."""
        done = [n for n in self.checkpoints() if self.checkpoint_record(n) is not None]
        return os.path.join(self.path, max(done, key=lambda n: int(_CHECKPOINT.match(n)[1]))) if done else None

    def resolve_resume(self, value: str | None) -> str | None:
        if value in (None, "", "false", "False"):
            return None
        if value in ("true", "True", "last"):
            found = self.last_complete_checkpoint()
            if found is None:
                raise QMiLoRAError(f"--resume_from_checkpoint {value}: no complete checkpoint in {self.path}")
            return self.verified_checkpoint(os.path.basename(found))
        name = os.path.basename(os.path.normpath(value))
        if not _CHECKPOINT.match(name) or RunFolder(os.path.dirname(os.path.normpath(value))).checkpoint_record(name) is None:
            raise QMiLoRAError(f"--resume_from_checkpoint {value}: not a complete qmilora checkpoint directory")
        if os.path.realpath(os.path.dirname(os.path.normpath(value))) != os.path.realpath(self.path):
            raise QMiLoRAError(f"--resume_from_checkpoint {value}: the checkpoint is not in --output_dir {self.path}")
        return self.verified_checkpoint(name)

    def verified_checkpoint(self, name: str) -> str:
        """A complete checkpoint whose files are those Trainer wrote (Trainer unpickles some of them: a changed or
        added file is refused here, in one line, not loaded)."""
        path = os.path.join(self.path, name)
        changed = files.foreign(path, self.checkpoint_record(name) or {}, skip=(COMPLETE, STARTED))
        if changed:
            raise QMiLoRAError(f"cannot resume from {path}: {', '.join(changed[:3])} changed since the checkpoint was "
                               "written (or was added); resume from another checkpoint, or start a new run")
        return path

    # --- what this folder holds of qmilora's ---------------------------------------------------------------------
    def _recorded(self) -> dict[str, list]:
        """Every file the record and the checkpoint markers list, by path relative to the folder."""
        meta = self.meta() or {}
        written = meta.get("files") if isinstance(meta.get("files"), dict) else {}
        recorded = {rel: rec for rel, rec in written.items() if _plain_relative(rel)}
        for name in self.checkpoints():
            for rel, rec in (self.checkpoint_record(name) or {}).items():
                if _plain_relative(rel):
                    recorded[os.path.join(name, rel)] = rec
        return recorded

    def _unowned(self) -> list[str]:
        """What a new run here would have to remove or let Trainer overwrite, but that qmilora did not write: files
        in the run's own folders that are unrecorded or changed, checkpoint-N folders no qmilora run wrote, links."""
        recorded = self._recorded()
        found = []
        for name in sorted(os.listdir(self.path)):
            path = os.path.join(self.path, name)
            if os.path.islink(path):
                found.append(name)
            elif name in recorded and not files.matches(path, recorded[name]):
                found.append(name)  # a final file changed since: the next run's final files would replace it
            elif name == INITIAL or _CHECKPOINT.match(name) or any(r.startswith(name + os.sep) for r in recorded):
                if not os.path.isdir(path):
                    found.append(name)
                    continue
                complete = not _CHECKPOINT.match(name) or self.checkpoint_record(name) is not None
                if not complete:  # no qmilora run started it, or its save was cut short: not ours to judge
                    found.append(name + os.sep + (" (cut short while being saved: remove it)"
                                                  if os.path.isfile(os.path.join(path, STARTED)) else ""))
                    continue
                ours = {rel.split(os.sep, 1)[1]: rec for rel, rec in recorded.items() if rel.startswith(name + os.sep)}
                found += [os.path.join(name, rel) for rel in files.foreign(path, ours, skip=(COMPLETE, STARTED))]
            elif name in FINAL_NAMES and name not in recorded:
                found.append(name)  # the final files would have to replace it, after all the training
        return found

    # --- writing -------------------------------------------------------------------------------------------------
    def claim(self, *, resume: bool, overwrite: bool) -> None:
        """Check, before any preparation, that this run may write here; refuse with one line otherwise."""
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise QMiLoRAError(f"--output_dir {self.path} is a file, not a directory")
        checkpoint.check_writable(self.path)
        if not os.path.isdir(self.path):
            return
        files.check_own_output(self.path, "--output_dir")
        files.remove_stale_temporaries(self.path)
        entries = [n for n in os.listdir(self.path) if n != LOCK]
        if not entries:
            return
        meta = self.meta()
        if meta is None:
            raise QMiLoRAError(f"--output_dir {self.path} is not empty and holds no qmilora run; qmilora never "
                               "writes over files it did not create: choose a new or empty directory")
        links = _links(self.path)
        if links:
            raise QMiLoRAError(f"--output_dir {self.path} holds a symlink ({links[0]}); qmilora neither follows nor "
                               "removes links in a run folder: replace it with what it points to, or remove it")
        if meta.get("schema") != SCHEMA and not resume:
            raise QMiLoRAError(f"--output_dir {self.path} holds a run of an earlier qmilora version, which did not "
                               "record its files' digests; move it away or choose another --output_dir")
        unowned = self._unowned()
        if unowned:
            raise QMiLoRAError(f"--output_dir {self.path} holds {', '.join(unowned[:3])}, which no qmilora run wrote "
                               "(or which changed since); Trainer would overwrite or delete it: move it out first")
        if resume:
            return
        if (self.checkpoints() or meta.get("state") == "complete") and not overwrite:
            raise QMiLoRAError(f"--output_dir {self.path} holds an earlier run's results; resume it with "
                               "--resume_from_checkpoint true, or pass --overwrite_output_dir to replace them")

    @contextlib.contextmanager
    def lock(self, enabled: bool = True):
        """Hold the folder for one training process: a second `qmilora-train` into it is refused in one line. A lock
        whose process has ended on this host is taken over; the folder is removed again if this made it and left
        it empty."""
        if not enabled:
            yield
            return
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise QMiLoRAError(f"--output_dir {self.path} is a file, not a directory")
        checkpoint.check_writable(self.path)
        files.check_own_output(self.path, "--output_dir")
        made = not os.path.isdir(self.path)
        os.makedirs(self.path, exist_ok=True)
        path = os.path.join(self.path, LOCK)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                with files.open_new(path, 0o644) as f:
                    f.write(json.dumps(me).encode())
                break
            except FileExistsError:
                holder = _read_json(path)
                dead = holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                    and not files._alive(holder["pid"])
                # a lock without its pid: its writer was killed between creating and filling it (or is just now
                # filling it: only an old one is stale)
                unfinished = not holder and time.time() - _mtime(path) > 10
                if dead or unfinished:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)  # the process that held it has ended
                    continue
                raise QMiLoRAError(f"--output_dir {self.path} is in use by another qmilora-train (pid "
                                   f"{holder.get('pid')} on {holder.get('host')}); wait for it, or choose another "
                                   f"--output_dir (a crashed run's lock from another host: remove {path})") from None
        else:
            raise QMiLoRAError(f"could not lock {self.path}; choose another --output_dir")
        try:
            yield
        finally:
            if _read_json(path) == me:
                os.remove(path)
            if made:
                with contextlib.suppress(OSError):
                    os.rmdir(self.path)  # only if empty: nothing was written

    def check_resume(self, checkpoint_dir: str, source_identity: str, recipe: dict, resume_recipe: dict) -> dict:
        """A checkpoint continues only the run it belongs to: same source content, same decomposition, same training
        recipe, data and tokenizer. The one change allowed is training longer (a larger --max_steps or
        --num_train_epochs); it is returned as {field: [was, now]} for the run's history."""
        meta = self.meta() or {}
        if meta.get("schema") != SCHEMA or "recipe" not in meta or "resume_recipe" not in meta:
            raise QMiLoRAError(f"cannot resume from {checkpoint_dir}: {self.path} has no run record of this qmilora "
                               "version")
        if meta["source"].get("identity") != source_identity:
            raise QMiLoRAError(f"cannot resume from {checkpoint_dir}: it was trained on another model "
                               f"({meta['source'].get('path')}); pass that --model, or start a new run")
        was, now = {**meta["recipe"], **meta["resume_recipe"]}, _plain({**recipe, **resume_recipe})
        if "qmilora.lora_dropout" not in was:  # recorded before the dropout joined the recipe: the run's own setting
            was["qmilora.lora_dropout"] = (meta.get("qmilora") or {}).get("lora_dropout")
        changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
        longer = {k: [was[k], now[k]] for k in changed if k in _LONGER and _longer(k, was, now)}
        changed = [k for k in changed if k not in longer]
        if changed:
            diff = "; ".join(_change(k, was.get(k), now.get(k)) for k in changed[:6])
            more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
            raise QMiLoRAError(f"cannot resume from {checkpoint_dir}: a resume continues the recorded recipe, and "
                               f"this run changes {diff}{more}; drop those flags (only training longer is allowed), "
                               "or start a new run")
        return longer

    def begin(self, meta: dict, *, resume: bool) -> None:
        """Record the run as started; a new run first removes what an earlier run wrote here (claim checked that
        everything it would remove is qmilora's)."""
        os.makedirs(self.path, exist_ok=True)
        old = self.meta() or {}
        if resume and meta.get("resumed_from"):
            self.drop_checkpoints_after(int(_CHECKPOINT.match(os.path.basename(os.path.normpath(meta["resumed_from"])))[1]))
        if not resume:
            for name in self.checkpoints():
                self.remove_checkpoint(name)
            written = old.get("files") if isinstance(old.get("files"), dict) else {}
            files.remove_recorded(self.path, {rel: rec for rel, rec in written.items() if _plain_relative(rel)})
        # a resumed run keeps the record of the files an earlier completion wrote: its own to replace
        kept = {"files": old.get("files", {}), "history": old.get("history", [])} if resume else {"history": []}
        event = {"resumed_from": meta.get("resumed_from"), **({"longer": meta["longer"]} if meta.get("longer") else {})}
        kept["history"] = kept["history"] + [event if resume else {"started": True}]
        self.write_meta({**meta, **kept, "schema": SCHEMA, "state": "training" if resume else "preparing"})
        self.fresh = not resume

    def discard_unstarted(self) -> None:
        """After a new run failed while preparing (before training began): remove its record and initial adapter
        (each while it holds the bytes recorded), so no half-written run is left. Once training has begun the record
        stays, failed or not."""
        meta = self.meta() if self.fresh else None
        if meta is None or meta.get("state") != "preparing":  # (a new run's `begin` removed earlier checkpoints)
            return
        files.remove_recorded(self.path, {rel: rec for rel, rec in (meta.get("files") or {}).items()
                                          if _plain_relative(rel)})
        os.remove(self.meta_path)
        self.fresh = False

    def write_meta(self, meta: dict) -> None:
        files.write_atomic(self.meta_path, json.dumps(meta, indent=2, default=str).encode())

    def update(self, **fields) -> dict:
        meta = {**(self.meta() or {}), **fields}
        self.write_meta(meta)
        return meta

    def write_initial(self, model) -> None:
        """The minor factors at init, from this run's preparation (kept on resume: the recipe was verified equal)."""
        if os.path.isdir(self.initial):
            return
        with files.atomic_dir(self.initial) as tmp:
            model.save_pretrained(tmp)
            written = {os.path.join(INITIAL, rel): rec for rel, rec in files.manifest(tmp, skip=(files.MARKER,)).items()}
        meta = self.meta() or {}
        self.write_meta({**meta, "files": {**(meta.get("files") or {}), **written}})

    def start_checkpoint(self, step: int) -> None:
        """Mark checkpoint-N as this run's before Trainer writes into it, so that a save cut short is known as ours."""
        path = os.path.join(self.path, f"checkpoint-{step}")
        if os.path.islink(path):
            raise QMiLoRAError(f"{path} became a symlink during the run; stopped (nothing is written through links)")
        os.makedirs(path, exist_ok=True)
        if not os.path.exists(os.path.join(path, STARTED)):
            files.write_atomic(os.path.join(path, STARTED), json.dumps({"pid": os.getpid()}).encode())

    def remove_checkpoint(self, name: str) -> None:
        """A complete checkpoint's recorded files, then its markers and folder (kept if a file of the user's is in
        it, which the next run then refuses to touch)."""
        path = os.path.join(self.path, name)
        files.remove_recorded(path, self.checkpoint_record(name) or {})
        for marker in (COMPLETE, STARTED):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(path, marker))
        with contextlib.suppress(OSError):
            os.rmdir(path)

    def drop_checkpoints_after(self, step: int) -> None:
        """On a resume, the checkpoints after the one resumed from belong to the abandoned continuation. Trainer
        would write the new ones into the same files in place, through any hard link a user made to back them up:
        their files are removed first, so the new ones are new files."""
        for name in self.checkpoints():
            if int(_CHECKPOINT.match(name)[1]) > step and self.checkpoint_record(name) is not None:
                self.remove_checkpoint(name)

    def rotate(self, limit: int | None, keep: str | None = None) -> None:
        """Keep the newest `limit` complete checkpoints (and `keep`, Trainer's best one). Trainer's own rotation
        deletes whole folders, a file a user put into one included; this removes only what each one recorded."""
        if not limit or limit < 1:
            return
        done = sorted((n for n in self.checkpoints() if self.checkpoint_record(n) is not None),
                      key=lambda n: int(_CHECKPOINT.match(n)[1]))
        kept = set(done[-limit:]) | ({os.path.basename(os.path.normpath(keep))} if keep else set())
        for name in done:
            if name not in kept:
                self.remove_checkpoint(name)

    def mark_complete_checkpoint(self, step: int) -> None:
        """Record a checkpoint Trainer has written in full: its files, sizes and digests (what a later run may
        remove, and what makes it resumable); its files get the user's normal permissions."""
        path = os.path.join(self.path, f"checkpoint-{step}")
        if os.path.islink(path) or _links(path):
            raise QMiLoRAError(f"{path} holds a symlink now; stopped (nothing is written or changed through links)")
        if os.path.isdir(path):
            files.set_modes(path)
            record = files.manifest(path, skip=(COMPLETE, STARTED))
            files.write_atomic(os.path.join(path, COMPLETE), json.dumps(record, indent=1).encode())

    def finish(self, write_files, meta: dict) -> None:
        """`write_files(tmp)` writes the final files; they replace this run's earlier ones; qmilora.json goes last,
        marking the run complete only once the adapter beside it is final."""
        files.remove_stale_temporaries(self.path)
        recorded = (self.meta() or {}).get("files") or {}
        tmp = files.make_temporary(self.path, "final")
        try:
            write_files(tmp)  # the marker stays until the end: a write killed midway is cleaned up next time
            files.set_modes(tmp)
            written = files.manifest(tmp, skip=(files.MARKER,))
            names = sorted(n for n in os.listdir(tmp) if n != files.MARKER)
            foreign = [n for n in names if os.path.lexists(os.path.join(self.path, n)) and _not_ours(self.path, n, recorded)]
            if foreign:  # someone put these here while the run trained: never replace them
                kept = os.path.join(self.path, f"final-outputs-{os.getpid()}")
                os.remove(os.path.join(tmp, files.MARKER))
                os.rename(tmp, kept)
                raise QMiLoRAError(f"{self.path} now holds {', '.join(foreign)}, which this run did not write; it "
                                   f"replaced nothing: the trained adapter and the other final files are in {kept} "
                                   "(move them into place, or your files away and resume with "
                                   "--resume_from_checkpoint true)")
            for name in names:
                dest = os.path.join(self.path, name)
                if os.path.isdir(dest) and not os.path.islink(dest):
                    files.remove_recorded(self.path, {r: v for r, v in recorded.items() if r.startswith(name + os.sep)})
                os.replace(os.path.join(tmp, name), dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        initial = {r: v for r, v in recorded.items() if r.startswith(INITIAL + os.sep)}
        self.write_meta({**meta, "history": (self.meta() or {}).get("history", []), "schema": SCHEMA,
                         "state": "complete", "files": {**initial, **written}})


_LONGER = ("training.max_steps", "training.num_train_epochs")


def _longer(key: str, was: dict, now: dict) -> bool:
    """Whether `now` trains longer than `was` in `key` and nothing else decides the length against it."""
    old, new = was.get(key), now.get(key)
    if not isinstance(old, (int, float)) or not isinstance(new, (int, float)) or new <= old:
        return False
    if key == "training.max_steps":
        return old > 0  # from an epoch-based run (-1) the step count is no extension of anything
    return was.get("training.max_steps", -1) <= 0 and now.get("training.max_steps", -1) <= 0


def _not_ours(folder: str, name: str, recorded: dict) -> bool:
    path = os.path.join(folder, name)
    if os.path.isdir(path) and not os.path.islink(path):
        ours = {r.split(os.sep, 1)[1]: v for r, v in recorded.items() if r.startswith(name + os.sep)}
        return bool(files.foreign(path, ours))
    return name not in recorded or not files.matches(path, recorded[name])


def _links(folder: str) -> list[str]:
    found = []
    for base, dirs, names in os.walk(folder):
        for name in dirs + names:
            if os.path.islink(os.path.join(base, name)):
                found.append(os.path.relpath(os.path.join(base, name), folder))
    return sorted(found)


def _plain_relative(rel) -> bool:
    """A record names entries of this folder only; anything else is not ours to remove."""
    return isinstance(rel, str) and rel != "" and not os.path.isabs(rel) and ".." not in rel.split(os.sep)


def _mtime(path: str) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return time.time()


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _plain(value):
    """`value` as it reads back from qmilora.json (tuples become lists, other objects their text)."""
    return json.loads(json.dumps(value, default=str))


def _change(key: str, was, now) -> str:
    if isinstance(was, list) and isinstance(now, list) and all(isinstance(x, list) and len(x) == 2 for x in was + now):
        # [name, digest] pairs (the tokenizer's files): name the files that differ
        a, b = dict(map(tuple, was)), dict(map(tuple, now))
        names = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
        return f"{key}: {', '.join(names)} differ"
    return f"{key}: {_short(was)} -> {_short(now)}"


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
