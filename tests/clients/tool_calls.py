"""Tool calling through a shoal swarm, with the official `openai` package.

Usage: python3 tests/clients/tool_calls.py BASE_URL MODEL [--random-weights]
Exits non-zero (with the failing check) when a forced call does not parse or does not satisfy
its function's parameters (checked by `jsonschema`), when streamed deltas do not reassemble
into the same calls, when a tool result round trip fails, or when bad tool requests are not
400s. With --random-weights (a model whose text means nothing) only what the grammar
guarantees is checked. Run by tests/tool_calls.rs.
"""

import json
import sys

import jsonschema
import openai

base_url, model = sys.argv[1], sys.argv[2]
random_weights = "--random-weights" in sys.argv
client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
checks = []


def check(name, cond, detail=""):
    checks.append(name)
    if not cond:
        sys.exit(f"FAILED {name}: {detail}")


WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 30},
                          "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object",
        "properties": {"timezone": {"type": "string", "maxLength": 30},
                       "hours": {"type": "integer", "minimum": 0, "maximum": 23}},
        "required": ["timezone", "hours"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                      "parameters": TIME}},
]
PARAMS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def valid_calls(calls):
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments), PARAMS[c.function.name])
    return True


def create(**kw):
    kw.setdefault("messages", ASK)
    kw.setdefault("max_tokens", 120)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, tools=TOOLS, **kw)


# `required`, one call.
r = create(tool_choice="required", parallel_tool_calls=False)
m = r.choices[0].message
check("required: one call", m.tool_calls is not None and len(m.tool_calls) == 1 and valid_calls(m.tool_calls), m)
check("required: finish_reason", r.choices[0].finish_reason == "tool_calls", r.choices[0].finish_reason)
check("required: call ids", m.tool_calls[0].id.startswith("call_") and m.tool_calls[0].type == "function", m)
first = m

# A named function, sampled at temperature 1.
for seed in (1, 2, 3):
    r = create(tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False,
               temperature=1.0, seed=seed)
    calls = r.choices[0].message.tool_calls or []
    check(f"named function (seed {seed})", len(calls) == 1 and calls[0].function.name == "get_time"
          and valid_calls(calls), r.choices[0].message)

# Parallel calls allowed: every complete call is valid.
r = create(tool_choice="required", max_tokens=100)
calls = r.choices[0].message.tool_calls or []
check("parallel calls", len(calls) >= 1 and valid_calls(calls), r.choices[0].message)

# Streamed deltas reassemble into the calls of the same request unstreamed.
want = create(tool_choice="required", parallel_tool_calls=False).choices[0].message.tool_calls
got, finish = {}, None
for chunk in create(tool_choice="required", parallel_tool_calls=False, stream=True):
    if not chunk.choices:
        continue
    d = chunk.choices[0].delta
    for tc in d.tool_calls or []:
        entry = got.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
        if tc.id:
            entry["id"] = tc.id
        if tc.function and tc.function.name:
            entry["name"] += tc.function.name
        if tc.function and tc.function.arguments:
            entry["arguments"] += tc.function.arguments
    finish = chunk.choices[0].finish_reason or finish
streamed = [(e["name"], json.loads(e["arguments"])) for _, e in sorted(got.items())]
check("streamed deltas", streamed == [(c.function.name, json.loads(c.function.arguments)) for c in want]
      and all(e["id"] for e in got.values()) and finish == "tool_calls", (got, want))

# A full round trip: the call, its result, then an answer in text.
call = first.tool_calls[0]
history = ASK + [
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": call.id, "type": "function",
                     "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "clear"})},
]
r = create(messages=history, tool_choice="none", max_tokens=40)
answer = r.choices[0].message
check("round trip answer", answer.tool_calls is None and isinstance(answer.content, str) and answer.content, answer)
if not random_weights:
    check("round trip uses the result", "18" in answer.content, answer.content)
r = create(messages=history, max_tokens=40)
check("round trip with tools offered", r.choices[0].finish_reason in ("stop", "length", "tool_calls"), r)

# `auto`: the model decides; whatever it does is well formed.
r = create(tool_choice="auto", max_tokens=60)
m = r.choices[0].message
check("auto", (m.tool_calls is None and m.content) or valid_calls(m.tool_calls), m)

# `none`: no calls.
r = create(tool_choice="none", max_tokens=20)
check("none", r.choices[0].message.tool_calls is None and r.choices[0].finish_reason != "tool_calls", r)

for name, kw, needle in [
    ("unknown named function", {"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ("tool message without a call", {"messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}]}, "tool"),
    ("bad function name", {"tools": [{"type": "function", "function": {"name": "a b"}}]}, "a b"),
    ("required with a schema too", {"tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
]:
    try:
        args = {"messages": ASK, "max_tokens": 5, "tools": TOOLS}
        args.update(kw)
        client.chat.completions.create(model=model, **args)
        check(f"400 {name}", False, "accepted")
    except openai.BadRequestError as e:
        check(f"400 {name}", needle in str(e), str(e))

print(f"ok: {len(checks)} checks: {', '.join(checks)}")
