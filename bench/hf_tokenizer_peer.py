#!/usr/bin/env python3
"""Peer benchmark: Hugging Face `tokenizers` on the same text as bench_tokenizer.

    build/bench/bench_tokenizer --dump-text /tmp/tok.txt --dump-ids /tmp/tok_ids.json
    python3 bench/hf_tokenizer_peer.py --tokenizer tests/fixtures/qwen3-tokenizer \
        --text /tmp/tok.txt [--ids /tmp/tok_ids.json] [--repeat 5]

Prints encode throughput in MB/s (10^6 bytes of UTF-8 per second, best of --repeat
runs, one thread: the whole text is one encode call) and, with --ids, whether the ids
equal lockstep's.
"""
import argparse
import json
import os
import sys
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    parser.add_argument("--text", required=True, help="text written by bench_tokenizer --dump-text")
    parser.add_argument("--ids", help="ids written by bench_tokenizer --dump-ids, to compare")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer  # imported late so --help works without it

    tok = Tokenizer.from_file(os.path.join(args.tokenizer, "tokenizer.json"))
    with open(args.text, "rb") as f:
        data = f.read()
    text = data.decode("utf-8")

    ids = tok.encode(text, add_special_tokens=False).ids  # warm-up (and the ids to compare)
    best = float("inf")
    for _ in range(args.repeat):
        start = time.perf_counter()
        tok.encode(text, add_special_tokens=False)
        best = min(best, time.perf_counter() - start)
    print(f"hf tokenizers: {len(data) / 1e6:.2f} MB, {len(ids)} tokens, "
          f"encode {len(data) / 1e6 / best:.2f} MB/s as one call (best of {args.repeat})")

    # The same text as short documents, cut as bench_tokenizer's BM_EncodeDocuments cuts it:
    # at the first newline after every 1000 bytes; one encode call each, one thread.
    docs, start = [], 0
    while start < len(data):
        cut = data.find(b"\n", min(len(data), start + 1000))
        end = len(data) if cut < 0 else cut + 1
        docs.append(data[start:end].decode("utf-8"))
        start = end
    for d in docs:
        tok.encode(d, add_special_tokens=False)
    best_docs = float("inf")
    for _ in range(args.repeat):
        start_t = time.perf_counter()
        for d in docs:
            tok.encode(d, add_special_tokens=False)
        best_docs = min(best_docs, time.perf_counter() - start_t)
    print(f"hf tokenizers: {len(docs)} documents, encode {len(data) / 1e6 / best_docs:.2f} MB/s "
          f"one call per document (best of {args.repeat})")

    if args.ids:
        with open(args.ids) as f:
            ours = json.load(f)
        if ours == ids:
            print("ids: identical to lockstep")
        else:
            first = next((i for i, (a, b) in enumerate(zip(ours, ids)) if a != b), min(len(ours), len(ids)))
            print(f"ids: DIFFER at index {first} (lockstep {len(ours)} tokens, hf {len(ids)} tokens); "
                  f"lockstep {ours[first:first + 8]} vs hf {ids[first:first + 8]}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
