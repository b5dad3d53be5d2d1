"""Minimal reproduction for bitsandbytes (CPU with AVX512-BF16): after one eval-mode, no-grad forward,
`Linear4bit` keeps a repacked inference layout and passes no gradient to its input in training mode.

    python scripts/bnb_cpu_repack_repro.py
Prints the input gradient before and after the eval forward; on an affected CPU the second is None.
"""
import torch

import bitsandbytes as bnb
from bitsandbytes.functional import has_avx512bf16


def layer() -> bnb.nn.Linear4bit:
    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(512, 256, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(256, 512), requires_grad=False, quant_type="nf4")
    return lin.to("cpu")  # quantizes here (bitsandbytes' documented path)


def input_grad(lin: bnb.nn.Linear4bit):
    lin.train()
    x = torch.randn(4, 512, requires_grad=True)
    lin(x).sum().backward()
    return x.grad


if __name__ == "__main__":
    print("bitsandbytes", bnb.__version__, "| AVX512-BF16:", has_avx512bf16())
    lin = layer()
    print("before eval forward: input grad is None ->", input_grad(lin) is None)
    lin.eval()
    with torch.no_grad():
        lin(torch.randn(3, 512))
    print("packed for CPU inference:", getattr(lin.weight.quant_state, "packing_format_for_cpu", False))
    print("after eval forward:  input grad is None ->", input_grad(lin) is None)
