"""The same model's training step in Hugging Face transformers, as scripts/device-check times it
beside kiln's: the config kiln exports (`kiln emit hf-config SPEC`), BF16 autocast over f32
weights, cross-entropy on next tokens, fused AdamW; eager or torch.compile. Prints one JSON
object (tokens/s is the median step's).

  torch_train_step.py CONFIG.json --batch B --seq T [--steps N] [--compile] [--device cuda]

Needs torch and transformers (the GPU machine's python3 has both). Random token ids: the
time of a step does not depend on the data.
"""
import argparse
import json
import statistics
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(a.config)
    model = AutoModelForCausalLM.from_config(cfg).float().to(a.device)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    fused = a.device == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    vocab = cfg.vocab_size
    x = torch.randint(0, vocab, (a.batch, a.seq + 1), device=a.device)

    def step():
        with torch.autocast(a.device, dtype=torch.bfloat16):
            logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, vocab), x[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    f = torch.compile(step) if a.compile else step

    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up (and compilation)
        f()
    sync()
    times = []
    for _ in range(max(1, a.steps)):
        t = time.perf_counter()
        loss = f()
        sync()
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    print(json.dumps({
        "engine": "transformers " + ("torch.compile" if a.compile else "eager"),
        "torch": torch.__version__,
        "model_type": cfg.model_type,
        "params": params,
        "batch": a.batch,
        "seq_len": a.seq,
        "step_s": round(dt, 5),
        "tokens_per_s": round(a.batch * a.seq / dt, 1),
        "loss": float(loss),
        "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
    }))


if __name__ == "__main__":
    sys.exit(main())
