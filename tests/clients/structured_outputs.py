"""Structured outputs through a shoal swarm, checked with the official `openai` package and
an independent validator (`jsonschema`).

Usage: python3 tests/clients/structured_outputs.py BASE_URL MODEL
Exits non-zero (with the failing check) when an output does not parse or does not satisfy its
schema, when streamed and whole outputs differ, or when a bad schema is not a 400 naming it.
Run by tests/structured_outputs.rs against `shoal run --stages 3 --listen`.
"""

import json
import re
import sys
from typing import List, Literal

import jsonschema
import openai
import pydantic

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
checks = []


def check(name, cond, detail=""):
    checks.append(name)
    if not cond:
        sys.exit(f"FAILED {name}: {detail}")


def ask(prompt, fmt, **kw):
    kw.setdefault("temperature", 0)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                       max_tokens=kw.pop("max_tokens", 200), response_format=fmt, **kw)
    return r


SCHEMAS = {
    "object": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0,
                                                                            "maximum": 120},
                       "student": {"type": "boolean"}},
        "required": ["name", "age", "student"], "additionalProperties": False,
    },
    "array of enums with bounds": {
        "type": "object",
        "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                  "minItems": 2, "maxItems": 3}},
        "required": ["colors"], "additionalProperties": False,
    },
    "nested objects and numbers": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "location": {"type": "object",
                         "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                        "lon": {"type": "number", "minimum": -180, "maximum": 180}},
                         "required": ["lat", "lon"], "additionalProperties": False},
            "population": {"type": "integer", "minimum": 1, "maximum": 100000000},
        },
        "required": ["city", "location", "population"], "additionalProperties": False,
    },
    "array of objects": {
        "type": "array", "minItems": 1, "maxItems": 3,
        "items": {"type": "object", "properties": {"fruit": {"type": "string", "maxLength": 20},
                                                  "ripe": {"type": "boolean"}},
                  "required": ["fruit", "ripe"], "additionalProperties": False},
    },
}
PROMPTS = {
    "object": "Describe a student called Ana as JSON.",
    "array of enums with bounds": "Pick some colors, as JSON.",
    "nested objects and numbers": "Describe Paris as JSON.",
    "array of objects": "List fruits as JSON.",
}

for name, schema in SCHEMAS.items():
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    r = ask(PROMPTS[name], fmt)
    text = r.choices[0].message.content
    try:
        value = json.loads(text)
        jsonschema.validate(value, schema)
        ok = True
    except Exception as e:  # noqa: BLE001 - the check reports it
        ok, value = False, e
    check(f"json_schema {name}", ok and r.choices[0].finish_reason == "stop", (text, value))

    # Sampled at temperature 1 with a seed, and streamed: the same text, still valid.
    a = ask(PROMPTS[name], fmt, temperature=1.0, seed=7)
    parts = []
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPTS[name]}], max_tokens=200,
            response_format=fmt, temperature=1.0, seed=7, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    sampled = a.choices[0].message.content
    try:
        jsonschema.validate(json.loads(sampled), schema)
        ok = True
    except Exception as e:  # noqa: BLE001
        ok = e
    check(f"sampled {name}", ok is True and a.choices[0].finish_reason == "stop", (sampled, ok))
    check(f"streamed {name}", "".join(parts) == sampled, ("".join(parts), sampled))

# n choices, each its own grammar state.
r = ask("Pick some colors, as JSON.", {"type": "json_schema", "json_schema": {
    "name": "c", "schema": SCHEMAS["array of enums with bounds"]}}, temperature=1.0, seed=3, n=3)
for c in r.choices:
    jsonschema.validate(json.loads(c.message.content), SCHEMAS["array of enums with bounds"])
check("n choices", len(r.choices) == 3, r)

r = ask("List two colors.", {"type": "json_object"})
check("json_object", isinstance(json.loads(r.choices[0].message.content), dict), r.choices[0].message.content)


# The SDK's own structured-output helper with a pydantic model.
class Pet(pydantic.BaseModel):
    kind: Literal["cat", "dog", "bird"]
    name: str = pydantic.Field(max_length=20)
    legs: int = pydantic.Field(ge=0, le=4)


class Household(pydantic.BaseModel):
    pets: List[Pet] = pydantic.Field(min_length=1, max_length=2)
    owner: str = pydantic.Field(max_length=20)


parsed = client.chat.completions.parse(model=model, messages=[{"role": "user", "content": "Describe a household."}],
                                       response_format=Household, max_tokens=200, temperature=0)
check("sdk parse with pydantic", isinstance(parsed.choices[0].message.parsed, Household), parsed)

# Completions: a regex and a choice (vLLM's fields).
r = client.completions.create(model=model, prompt="The date today is", max_tokens=20, temperature=0,
                              extra_body={"guided_regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"})
check("guided_regex", re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r.choices[0].text) is not None, r.choices[0].text)
r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=10, temperature=0,
                              extra_body={"guided_choice": ["Paris", "London", "Rome"]})
check("guided_choice", r.choices[0].text in ("Paris", "London", "Rome"), r.choices[0].text)
r = client.completions.create(model=model, prompt="Answer yes or no:", max_tokens=10, temperature=0,
                              extra_body={"guided_grammar": 'start: "yes" | "no"'})
check("guided_grammar", r.choices[0].text in ("yes", "no"), r.choices[0].text)

# Errors: a feature llguidance does not implement, a malformed grammar, two grammars at once.
for name, body, needle in [
    ("unknown format", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "format": "no-such-format"}}}}, "no-such-format"),
    ("bad regex", {"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
    ("two grammars", {"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, "at most one"),
    ("unknown type", {"response_format": {"type": "yaml"}}, "yaml"),
]:
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=5, **body)
        check(f"400 {name}", False, "accepted")
    except openai.BadRequestError as e:
        check(f"400 {name}", needle in str(e), str(e))

print(f"ok: {len(checks)} checks: {', '.join(checks)}")
