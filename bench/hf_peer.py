"""The HF transformers peer of bench/cuda_bench.cpp: Qwen3-30B-A3B with random bf16 weights
on one GPU, the same prefill (8 x 2048, last-token logits) and decode (prompt 128, sampled at
temperature 1) measurements. Prints one JSON object per line.

    python3 bench/hf_peer.py models/qwen3-30b-a3b/config.json [--layers N] [--quick]
    python3 bench/hf_peer.py CONFIG --train [--layers N] [--batch B] [--seq S]

--train measures instead one forward + backward of B x S tokens (mean next-token NLL), the
peer of bench/cuda_train_bench.cpp.
"""
import argparse
import json
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM


def emit(**kv):
    print(json.dumps(kv), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    args = ap.parse_args()

    cfg = AutoConfig.from_pretrained(args.config)
    if args.layers:
        cfg.num_hidden_layers = args.layers
    t0 = time.time()
    # Built directly on the GPU in bf16: HF's own initialiser draws the random weights there.
    with torch.device("cuda"):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        except TypeError:
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    model.eval()
    torch.cuda.synchronize()
    emit(event="hf_weights", seconds=time.time() - t0, transformers=transformers.__version__, torch=torch.__version__,
         layers=cfg.num_hidden_layers, attn=getattr(model.config, "_attn_implementation", None))
    V = cfg.vocab_size

    if args.train:
        model.train()
        ids = torch.randint(0, V, (args.batch, args.seq), device="cuda", generator=gen)

        def step():
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids, use_cache=False).loss.backward()

        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.time()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        sec = (time.time() - t) / 3
        emit(event="hf_train_step", layers=cfg.num_hidden_layers, batch=args.batch, seq=args.seq, seconds=sec,
             tok_s=args.batch * args.seq / sec, peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9)
        return

    with torch.no_grad():
        B, P = (2, 512) if args.quick else (8, 2048)
        ids = torch.randint(0, V, (B, P), device="cuda", generator=gen)
        model(ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        reps = 1 if args.quick else 3
        t = time.time()
        for _ in range(reps):
            model(ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        sec = (time.time() - t) / reps
        emit(event="hf_prefill", batch=B, prompt=P, seconds=sec, tok_s=B * P / sec)

        for B in ([1, 64] if args.quick else [1, 8, 64, 256]):
            steps = max(4, args.decode_steps // (2 if B >= 256 else 1))
            ids = torch.randint(0, V, (B, 128), device="cuda", generator=gen)
            out = model(ids, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            logits = out.logits[:, -1].float()
            torch.cuda.synchronize()
            t = time.time()
            for _ in range(steps):
                nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1].float()
            torch.cuda.synchronize()
            sec = time.time() - t
            emit(event="hf_decode", batch=B, prompt=128, steps=steps, seconds=sec, tok_s=B * steps / sec)


if __name__ == "__main__":
    main()
