"""Run by torchrun in tests (2 CPU processes, gloo): one optimizer step of a prepared model sharded with PyTorch's
FSDP, against the same step on one process with the whole batch. Rank 0 writes what it gathered for the test.
FSDP2: fully_shard per decoder layer, then the root (accelerate's fsdp_version 2); FSDP1: flat parameters wrapped
by PEFT's auto-wrap policy (accelerate's fsdp_version 1, the FSDP-QLoRA recipe).

    torchrun --nproc_per_node 2 tests/fsdp_worker.py MODEL CACHE OUT STORAGE fsdp1|fsdp2
"""
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from qmilora import QMiLoRAConfig, prepare_model

model_dir, cache, out, storage, version = sys.argv[1:6]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = QMiLoRAConfig(rank=4, lora_dropout=0.0, cache_dir=cache, quant_storage=storage, device="cpu")
torch.manual_seed(0)
ids = torch.randint(0, 100, (2 * world, 12))


def step(model, batch):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    loss = model(input_ids=batch, labels=batch).loss  # same token count on every rank: the mean of means is the mean
    loss.backward()
    optimizer.step()
    return loss.detach()


single = prepare_model(model_dir, cfg)
single_loss = step(single, ids)
reference = {k: v.detach().clone() for k, v in single.state_dict().items()}

sharded = prepare_model(model_dir, cfg)
if version == "fsdp2":
    # under mixed precision every floating-point parameter is cast to one compute dtype after the all-gather
    policy = MixedPrecisionPolicy(param_dtype=torch.float32)
    for layer in sharded.get_base_model().model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(sharded, mp_policy=policy)
else:
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel

    sharded = FullyShardedDataParallel(sharded, auto_wrap_policy=fsdp_auto_wrap_policy(sharded), use_orig_params=False,
                                       device_id=torch.device("cpu"))
local_loss = step(sharded, ids[rank * 2:(rank + 1) * 2])
dist.all_reduce(local_loss)
if version == "fsdp2":
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
else:  # as accelerate gathers FSDP1, without its offload_to_cpu (on a CPU that fails: storage of size 0)
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType

    with FullyShardedDataParallel.state_dict_type(sharded, StateDictType.FULL_STATE_DICT,
                                                  FullStateDictConfig(rank0_only=False)):
        full = {k.replace("_fsdp_wrapped_module.", ""): v for k, v in sharded.state_dict().items()}
if rank == 0:
    save_file({k: v.contiguous() for k, v in full.items()}, f"{out}/sharded.safetensors")
    save_file({k: v.contiguous() for k, v in reference.items()}, f"{out}/single.safetensors")
    save_file({"single": single_loss.reshape(1), "sharded": (local_loss / world).reshape(1)}, f"{out}/loss.safetensors")
dist.barrier()
dist.destroy_process_group()
