"""Run by torchrun in tests: qmilora-train's CLI, recording each process's prepared model (every tensor of its
state dict, 4-bit blocks and quantization constants included) and optionally killing the whole launch with
SIGKILL (torchrun and every rank) right after checkpoint KILL_AT is marked complete; TILE_TOKENS sets --tiled_mlp's
tile (the tiny models' hidden size would leave their short rows in one tile)."""
import hashlib
import os
import signal
import sys
import time

from accelerate import PartialState

import qmilora.prepare
import qmilora.tiled
import qmilora.train as T

prepare = qmilora.prepare.prepare_model


def recording_prepare(*args, **kwargs):
    model = prepare(*args, **kwargs)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    with open(os.path.join(os.environ["DIGEST_DIR"], f"rank{os.environ['RANK']}"), "w") as f:
        f.write(digest.hexdigest())
    return model


save = T._Progress.on_save


def on_save(self, args, state, control, **kw):
    save(self, args, state, control, **kw)
    if state.global_step == int(os.environ.get("KILL_AT", -1)):
        PartialState().wait_for_everyone()  # the marker is written
        if state.is_world_process_zero:
            os.kill(os.getppid(), signal.SIGKILL)  # torchrun first, so it cannot stop the ranks more gently
        else:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)  # torchrun runs each rank in a session of its own


import torch  # noqa: E402

qmilora.prepare.prepare_model = recording_prepare
if os.environ.get("TILE_TOKENS"):
    tile = qmilora.tiled.tile_position_wise
    qmilora.tiled.tile_position_wise = lambda model: tile(model, tokens=int(os.environ["TILE_TOKENS"]))
T._Progress.on_save = on_save
from qmilora.cli.train import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
