#!/usr/bin/env python3
"""How far HF transformers' own bf16 forward lands from the float64 reference of the fixture.

Prints, per fixture sequence, the max and median |logprob(bf16) - logprob(float64 reference)|, so
the bfloat16 recipe's error can be read against the peer's on the same model (routing flips at
near-tied experts included). Needs torch, transformers and safetensors (the GPU machine has them).
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

model_dir = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/hf-tiny-qwen3-moe"
device = "cuda" if torch.cuda.is_available() else "cpu"
golden = load_file(f"{model_dir}/golden.safetensors")
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16).to(device).eval()
worst, errors = 0.0, []
for i in range(5):
    ids = golden[f"seq{i}.input_ids"].to(device).view(1, -1)
    ref = golden[f"seq{i}.logprobs"].double()
    with torch.no_grad():
        logits = model(ids).logits.float()[0]
    logp = torch.log_softmax(logits, dim=-1)[:-1].gather(1, ids[0, 1:].view(-1, 1)).view(-1).double().cpu()
    err = (logp - ref).abs()
    if err.numel():
        errors.append(err)
        worst = max(worst, err.max().item())
        print(f"HF bf16 seq{i}: max abs err {err.max().item():.3g}, median {err.median().item():.3g}, "
              f"tokens > 5e-2: {(err > 5e-2).sum().item()} of {err.numel()}")
all_err = torch.cat(errors)
print(f"HF bf16 overall: max {worst:.3g}, median {all_err.median().item():.3g}, "
      f"tokens > 5e-2: {(all_err > 5e-2).sum().item()} of {all_err.numel()}")
