#!/usr/bin/env python3
"""Measures the GPU's FP8 tensor core for `kiln exp fp8-calibrate` (scripts/device-check).

Writes, for each case, a directory under OUT with meta.json, a.bin and b.bin (E4M3 codes,
[m, k] and [n, k]) and d.bin (the GPU's f32 products, [m, n], little-endian): products of
random E4M3 matrices by torch._scaled_mm (cuBLASLt) with unit scales and fast accumulation,
which never promotes the tensor core's partial sums to FP32. K = 32 is one tensor-core step
(what the models describe directly); K = 4096 chains 128 of them (DeepSeek-V3's experiment,
without promotion). Needs a GPU with FP8 tensor cores (sm_89 or later) and PyTorch.
"""

import json
import os
import sys

import torch


def case(out, name, m, n, k, seed):
    torch.manual_seed(seed)
    # Normal values with a positive mean: sums that partly cancel, over the E4M3 range.
    a = (torch.randn(m, k, device="cuda") + 0.65).to(torch.float8_e4m3fn)
    b = (torch.randn(n, k, device="cuda") + 0.65).to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda", dtype=torch.float32)
    d = torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                         use_fast_accum=True)
    torch.cuda.synchronize()
    path = os.path.join(out, name)
    os.makedirs(path, exist_ok=True)
    a.view(torch.uint8).cpu().numpy().tofile(os.path.join(path, "a.bin"))
    b.view(torch.uint8).cpu().numpy().tofile(os.path.join(path, "b.bin"))
    d.contiguous().cpu().numpy().astype("<f4").tofile(os.path.join(path, "d.bin"))
    meta = {
        "m": m, "n": n, "k": k, "format": "e4m3",
        "instruction": f"torch._scaled_mm (cuBLASLt), fast accumulation, "
                       f"{torch.cuda.get_device_name()}",
    }
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    return path


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: fp8_tensor_core.py OUT")
    if not torch.cuda.is_available():
        sys.exit("fp8_tensor_core.py: no GPU")
    for k, seed in [(32, 1), (4096, 2)]:
        print(case(sys.argv[1], f"k{k}", 256, 256, k, seed))


if __name__ == "__main__":
    main()
