"""Drives a shoal API with the official `openai` Python package, unmodified.

Usage: python3 tests/clients/openai_sdk.py BASE_URL MODEL API_KEY
Exits non-zero (with the failing check) when anything differs from OpenAI's behaviour.
Run by tests/openai_sdk.rs against `shoal run --stages 3 --listen`.
"""

import sys

import openai

base_url, model, key = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)
checks = []


def check(name, cond, detail=""):
    checks.append(name)
    if not cond:
        sys.exit(f"FAILED {name}: {detail}")


models = client.models.list()
check("models", [m.id for m in models.data] == [model], models)

messages = [{"role": "user", "content": "Name three fruits."}]
a = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0.9, seed=11)
b = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0.9, seed=11)
text = a.choices[0].message.content
check("chat", a.object == "chat.completion" and a.choices[0].message.role == "assistant" and text, a)
check("seeded reproducibility", b.choices[0].message.content == text, (text, b.choices[0].message.content))
check("usage", a.usage.completion_tokens <= 16 and a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens, a.usage)
check("finish_reason", a.choices[0].finish_reason in ("stop", "length"), a.choices[0].finish_reason)

stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=16, temperature=0.9, seed=11, stream=True,
    stream_options={"include_usage": True},
)
parts, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            parts.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
check("stream text equals non-stream", "".join(parts) == text, ("".join(parts), text))
check("stream include_usage", usage is not None and usage.completion_tokens == a.usage.completion_tokens, usage)
check("stream finish_reason", finish == a.choices[0].finish_reason, finish)

c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=20, temperature=0, stop=[".", "\n"])
check("completions stop", c.choices[0].text == " Paris" and c.choices[0].finish_reason == "stop", c)

d = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=3, temperature=0)
check("max_completion_tokens", d.usage.completion_tokens == 3 and d.choices[0].finish_reason == "length", d)

try:
    client.chat.completions.create(model=model, messages=messages, temperature=-3)
    check("bad request raises", False, "no error")
except openai.BadRequestError as e:
    check("bad request raises", e.status_code == 400 and "temperature" in str(e), e)

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    check("unknown model raises", False, "no error")
except openai.NotFoundError as e:
    check("unknown model raises", e.status_code == 404, e)

lp = client.chat.completions.create(
    model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
)
content = lp.choices[0].logprobs.content
check("chat logprobs", len(content) == lp.usage.completion_tokens
      and all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token and t.logprob <= 0 for t in content), content)

cl = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=3)
check("completion logprobs", "".join(cl.choices[0].logprobs.tokens) == cl.choices[0].text
      and len(cl.choices[0].logprobs.top_logprobs) == len(cl.choices[0].logprobs.tokens), cl.choices[0].logprobs)

many = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=1.0, seed=3, n=2)
one = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=1.0, seed=4)
check("n choices", [c.index for c in many.choices] == [0, 1]
      and many.choices[1].message.content == one.choices[0].message.content, many)

cs = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True)
check("completions stream", "".join(c.choices[0].text for c in cs if c.choices)
      == client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0).choices[0].text)

try:
    openai.OpenAI(base_url=base_url, api_key="wrong-key", max_retries=0).models.list()
    check("wrong API key raises", False, "no error")
except openai.AuthenticationError as e:
    check("wrong API key raises", e.status_code == 401, e)

print(f"ok: {len(checks)} checks: {', '.join(checks)}")
