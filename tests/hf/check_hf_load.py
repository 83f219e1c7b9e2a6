#!/usr/bin/env python3
"""Checks that a `lockstep train --save-hf` directory is a Hugging Face model transformers loads.

Loads DIR with transformers (AutoModelForCausalLM, float32, CPU) and its tokenizer
(AutoTokenizer), then checks:
  * config.json's fields as transformers reads them;
  * every parameter against the safetensors files (names, shapes, count, exact values), and
    that transformers reports no missing, unexpected or mismatched key (such a key would be
    randomly initialised, not loaded);
  * the per-token log-probs of a forward over --sequences against `lockstep score` output
    (--scores) within --tol: a cross-implementation check (the float32 recipe matches HF
    float64 to ~1e-6, docs/numerics.md), not a bit-parity test;
  * the tokenizer: chat prompts rendered and encoded as `lockstep tokenize` did (--chat), and
    decoded back to the same text.
Exit status 0: all checks pass; 1: a check failed (each failure is printed); 77: torch or
transformers is not importable (ctest reports the test SKIPPED).
"""
import argparse
import json
import os
import struct
import sys

SKIP = 77

try:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
except ImportError as e:  # the machine has no transformers: nothing to check here
    print(f"SKIP: {e}")
    sys.exit(SKIP)


class Checks:
    """Collects failures so one run reports all of them."""

    def __init__(self):
        self.failures = []

    def expect(self, ok, what):
        if not ok:
            self.failures.append(what)
            print(f"FAIL: {what}")
        return ok


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        out = []
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    sys.exit(f"{path}:{n}: not JSON: {e}")
        return out


def safetensors_header(path):
    """Tensor name -> (dtype, shape) from a safetensors file's JSON header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {name: (v["dtype"], tuple(v["shape"])) for name, v in header.items()}


def file_tensors(model_dir):
    """Tensor name -> (file, dtype, shape) over model.safetensors or the sharded index."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        weight_map, files = None, ["model.safetensors"]
    out = {}
    for name in files:
        for t, (dtype, shape) in safetensors_header(os.path.join(model_dir, name)).items():
            out[t] = (name, dtype, shape)
    if weight_map is not None and set(weight_map) != set(out):
        sys.exit(f"{index}: the weight map and the shards' tensors differ: "
                 f"{sorted(set(weight_map) ^ set(out))[:5]}")
    return out


def load_tensor(model_dir, file, name):
    from safetensors import safe_open  # a dependency of transformers

    with safe_open(os.path.join(model_dir, file), framework="pt") as f:
        return f.get_tensor(name).to(torch.float32)


def check_config(c, model_dir, model):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    hf = model.config
    c.expect(hf.model_type == "qwen3_moe", f"config: model_type {hf.model_type!r}, expected 'qwen3_moe'")
    c.expect(type(model).__name__ == "Qwen3MoeForCausalLM", f"model class {type(model).__name__}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok",
                "decoder_sparse_step", "norm_topk_prob", "tie_word_embeddings", "rms_norm_eps",
                "max_position_embeddings", "hidden_act"):
        c.expect(key in cfg, f"config.json has no {key}")
        if key in cfg:
            got = getattr(hf, key, None)
            if key == "num_experts" and got is None:  # transformers 5 names it num_local_experts
                got = getattr(hf, "num_local_experts", None)
            c.expect(got == cfg[key], f"config: {key} is {got!r} in transformers, {cfg[key]!r} in config.json")
    c.expect(list(getattr(hf, "mlp_only_layers", []) or []) == cfg.get("mlp_only_layers", []),
             f"config: mlp_only_layers {getattr(hf, 'mlp_only_layers', None)!r}")
    theta = getattr(hf, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(hf, "rope_parameters", None) or {}).get("rope_theta")
    c.expect(theta == cfg["rope_theta"], f"config: rope_theta {theta!r}, config.json {cfg['rope_theta']!r}")
    c.expect(not getattr(hf, "attention_bias", False), "config: attention_bias is on (lockstep has no biases)")
    c.expect(not getattr(hf, "use_sliding_window", False), "config: use_sliding_window is on")
    return cfg


def fused_expert_value(name, hf_shape, model_dir, files):
    """transformers 5 holds a layer's experts as one tensor (experts.gate_up_proj [E, 2I, H],
    experts.down_proj [E, H, I]); rebuild it from the per-expert tensors of the files."""
    prefix, _, kind = name.rpartition(".experts.")
    parts = []
    e = 0
    while f"{prefix}.experts.{e}.down_proj.weight" in files:
        get = lambda p: load_tensor(model_dir, files[f"{prefix}.experts.{e}.{p}.weight"][0],
                                    f"{prefix}.experts.{e}.{p}.weight")
        parts.append(torch.cat([get("gate_proj"), get("up_proj")]) if kind == "gate_up_proj" else get("down_proj"))
        e += 1
    if not parts or kind not in ("gate_up_proj", "down_proj"):
        return None, []
    used = [f"{prefix}.experts.{i}.{p}.weight" for i in range(e)
            for p in (("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",))]
    fused = torch.stack(parts)
    if tuple(fused.shape) != hf_shape and tuple(fused.transpose(1, 2).shape) == hf_shape:
        fused = fused.transpose(1, 2)  # a layout with the hidden size in the middle
    return fused, used


def check_parameters(c, model_dir, model, cfg, loading_info):
    files = file_tensors(model_dir)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = list((loading_info or {}).get(key, []) or [])
        if key == "missing_keys" and cfg.get("tie_word_embeddings"):
            keys = [k for k in keys if k != "lm_head.weight"]  # tied: the embedding
        c.expect(not keys, f"loading: {key} {keys[:8]}")
    used = set()
    hf_total = 0
    for name, p in model.named_parameters():  # a tied lm_head is listed once, as the embedding
        hf_total += p.numel()
        value = p.detach().to(torch.float32).cpu()
        if name in files:
            file, dtype, shape = files[name]
            used.add(name)
            if c.expect(tuple(p.shape) == shape, f"{name}: shape {tuple(p.shape)} in transformers, {shape} in {file}"):
                c.expect(torch.equal(value, load_tensor(model_dir, file, name)), f"{name}: values differ from {file}")
            continue
        fused, parts = fused_expert_value(name, tuple(p.shape), model_dir, files)
        if not c.expect(fused is not None, f"{name}: a transformers parameter with no tensor in the files"):
            continue
        used.update(parts)
        if c.expect(tuple(fused.shape) == tuple(p.shape), f"{name}: shape {tuple(p.shape)}, files give {tuple(fused.shape)}"):
            c.expect(torch.equal(value, fused), f"{name}: values differ from the per-expert tensors")
    c.expect(not (set(files) - used), f"tensors transformers did not take: {sorted(set(files) - used)[:8]}")
    file_total = sum(int(torch.tensor(s).prod()) if s else 1 for (_, _, s) in files.values())
    c.expect(hf_total == file_total, f"parameter count: {hf_total} in transformers, {file_total} in the files")
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    c.expect(tied == bool(cfg.get("tie_word_embeddings")), f"lm_head tied to the embedding: {tied}")
    print(f"parameters: {len(files)} tensors, {file_total} values, all equal to the files")


def check_logprobs(c, model, sequences, scores, tol):
    c.expect(len(sequences) == len(scores), f"{len(sequences)} sequences but {len(scores)} score lines")
    worst, spread = 0.0, []
    with torch.no_grad():
        for i, (seq, sc) in enumerate(zip(sequences, scores)):
            ids = torch.tensor([seq["input_ids"]], dtype=torch.long)
            logits = model(input_ids=ids).logits[0].to(torch.float64)
            hf = torch.log_softmax(logits, dim=-1)[:-1].gather(1, ids[0, 1:, None])[:, 0]
            ours = torch.tensor(sc["logprobs"], dtype=torch.float64)
            if not c.expect(hf.shape == ours.shape, f"sequence {i}: {hf.shape[0]} log-probs, lockstep gave {ours.shape[0]}"):
                continue
            diff = float((hf - ours).abs().max())
            worst = max(worst, diff)
            c.expect(diff <= tol, f"sequence {i}: log-probs differ by {diff:.3g} (> {tol:g})")
            spread.extend(ours.tolist())
    # Log-probs all near -log(vocab) would let a wrong model pass: demand a spread far above tol.
    s = float(torch.tensor(spread).std()) if len(spread) > 1 else 0.0
    c.expect(s > 100 * tol, f"the scored log-probs barely vary (std {s:.3g}): the check could not tell models apart")
    print(f"log-probs: {len(spread)} tokens, max |transformers - lockstep| = {worst:.3g} (tol {tol:g}), std {s:.3g}")


def check_tokenizer(c, model_dir, chats, rendered):
    tok = AutoTokenizer.from_pretrained(model_dir)
    c.expect(len(chats) == len(rendered), f"{len(chats)} chats but {len(rendered)} lockstep tokenize lines")
    for i, (chat, want) in enumerate(zip(chats, rendered)):
        if "text" in chat:  # plain text
            ids = tok(chat["text"], add_special_tokens=False)["input_ids"]
            c.expect(ids == want["input_ids"], f"text {i}: ids {ids[:12]}... vs lockstep {want['input_ids'][:12]}...")
            c.expect(tok.decode(ids) == chat["text"], f"text {i}: decode does not give the text back")
            continue
        kwargs = dict(add_generation_prompt=chat.get("add_generation_prompt", True),
                      enable_thinking=chat.get("enable_thinking", True))
        text = tok.apply_chat_template(chat["messages"], tokenize=False, **kwargs)
        c.expect(text == want["text"], f"chat {i}: rendered text differs:\n{text!r}\nvs lockstep\n{want['text']!r}")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        c.expect(ids == want["input_ids"], f"chat {i}: ids differ from lockstep's")
        c.expect(tok.decode(ids) == text, f"chat {i}: decode does not give the rendered text back")
    print(f"tokenizer: {len(chats)} prompts encode and decode as lockstep's ({type(tok).__name__})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a --save-hf directory (DIR/iter_N)")
    ap.add_argument("--sequences", required=True, help='JSONL {"input_ids": [...]}')
    ap.add_argument("--scores", required=True, help="`lockstep score --dtype float32` output for --sequences")
    ap.add_argument("--chat", help='JSONL {"messages": [...], "enable_thinking"?} or {"text": ...}')
    ap.add_argument("--chat-ids", help="`lockstep tokenize` output for --chat")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest |log-prob difference| allowed")
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    c = Checks()
    AutoConfig.from_pretrained(a.model)  # a config transformers cannot read fails here, by name
    # transformers 5 renamed torch_dtype to dtype (4.56 takes both).
    major = int(transformers.__version__.split(".")[0])
    dtype_kw = {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}
    model, info = AutoModelForCausalLM.from_pretrained(a.model, output_loading_info=True, **dtype_kw)
    model.eval()
    cfg = check_config(c, a.model, model)
    check_parameters(c, a.model, model, cfg, info)
    check_logprobs(c, model, read_jsonl(a.sequences), read_jsonl(a.scores), a.tol)
    if a.chat:
        check_tokenizer(c, a.model, read_jsonl(a.chat), read_jsonl(a.chat_ids))
    if c.failures:
        print(f"{len(c.failures)} checks failed")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
