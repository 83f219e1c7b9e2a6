#!/usr/bin/env python3
"""Renders chat_template_cases.json: conversations rendered with the real Jinja chat
template from the fixture tokenizer_config.json, in an environment configured like
transformers' apply_chat_template (trim_blocks, lstrip_blocks, tojson = json.dumps
with ensure_ascii=False). The C++ renderer must reproduce every "text" exactly.

Run from the repository root: python3 tests/tokenizer/gen_chat_cases.py
"""
import json

from jinja2.sandbox import ImmutableSandboxedEnvironment

config = json.load(open("tests/fixtures/qwen3-tokenizer/tokenizer_config.json"))
env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
template = env.from_string(config["chat_template"])

SYS = {"role": "system", "content": "You are terse."}
U1 = {"role": "user", "content": "What is 2+2?"}
A1 = {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"}
U2 = {"role": "user", "content": "And 3+3?"}
A2 = {"role": "assistant", "content": "<think>\n\nSix, clearly.\n\n</think>\n\n\n6"}
CALL = {"role": "assistant", "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": {"expr": "3+3", "ñ": [1, 2.5, None, True]}}},
                       {"function": {"name": "noop", "arguments": "{\"x\": 1}"}}]}
TOOL1 = {"role": "tool", "content": "6"}
TOOL2 = {"role": "tool", "content": "ok"}
TOOLS = [{"type": "function", "function": {"name": "calc", "description": "Évalue", "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}}}}]

cases = [
    ("single user", [U1], {}),
    ("system first", [SYS, U1], {}),
    ("no generation prompt", [SYS, U1, A1], {"add_generation_prompt": False}),
    ("thinking disabled", [U1], {"enable_thinking": False}),
    ("earlier reasoning stripped", [U1, A1, U2, A2], {"add_generation_prompt": False}),
    ("last assistant keeps reasoning", [U1, A1, U2, A2, U2], {}),
    ("reasoning_content field", [U1, {"role": "assistant", "content": "4", "reasoning_content": "\nsum\n"}], {"add_generation_prompt": False}),
    ("empty reasoning_content field", [U1, {"role": "assistant", "content": "x</think>y", "reasoning_content": ""}], {"add_generation_prompt": False}),
    ("assistant without think, last", [U1, {"role": "assistant", "content": "plain"}], {"add_generation_prompt": False}),
    ("assistant without think, not last", [U1, {"role": "assistant", "content": "plain"}, {"role": "assistant", "content": "more"}], {"add_generation_prompt": False}),
    ("multiple think tags", [U1, {"role": "assistant", "content": "<think>a</think>b<think>c</think>\n\nd"}], {"add_generation_prompt": False}),
    ("tool round trip", [SYS, U2, CALL, TOOL1, TOOL2, {"role": "assistant", "content": "<think>got it</think>6"}], {"add_generation_prompt": False}),
    ("tool results then prompt", [U2, CALL, TOOL1], {}),
    ("tools block with system", [SYS, U2], {"tools": TOOLS}),
    ("tools block without system", [U2], {"tools": TOOLS, "enable_thinking": False}),
    ("user wrapping a tool response", [U1, {"role": "assistant", "content": "<think>r</think>a"}, {"role": "user", "content": "<tool_response>\nx\n</tool_response>"}, {"role": "assistant", "content": "<think>s</think>b"}], {"add_generation_prompt": False}),
    ("second system message", [SYS, U1, {"role": "system", "content": "Be nice."}, U2], {}),
    ("assistant first", [{"role": "assistant", "content": "<think>t</think>hi"}, U1], {}),
    ("unicode content", [{"role": "user", "content": "中文 🤖 é\n\n"}], {"enable_thinking": False}),
]

out = []
for name, messages, opts in cases:
    kwargs = dict(messages=messages, add_generation_prompt=opts.get("add_generation_prompt", True))
    if "enable_thinking" in opts:
        kwargs["enable_thinking"] = opts["enable_thinking"]
    if "tools" in opts:
        kwargs["tools"] = opts["tools"]
    request = {"messages": messages, **opts}
    out.append({"name": name, "request": request, "text": template.render(**kwargs)})
with open("tests/tokenizer/chat_template_cases.json", "w") as f:
    json.dump(out, f, ensure_ascii=False, indent=1)
    f.write("\n")
