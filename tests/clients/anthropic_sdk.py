"""Drives a shoal node's Messages API with the official `anthropic` Python package, unmodified.

Usage: python3 tests/clients/anthropic_sdk.py BASE_URL MODEL API_KEY
(BASE_URL as the OpenAI clients take it, http://HOST:PORT/v1; the SDK adds /v1 itself.)
Exits non-zero (with the failing check) when anything differs from Anthropic's behaviour.
Run by tests/anthropic_sdk.rs against `shoal run --stages 3 --listen`.
"""

import sys

import anthropic

base_url, model, key = sys.argv[1], sys.argv[2], sys.argv[3]
root = base_url.removesuffix("/").removesuffix("/v1")
client = anthropic.Anthropic(base_url=root, api_key=key, max_retries=0, timeout=120)
checks = []
# This SDK has no sampling parameters of its own (the newest Claude models take none): like
# any field the SDK lacks, they go in extra_body, and the server reads them.
GREEDY = {"temperature": 0}


def check(name, cond, detail=""):
    checks.append(name)
    if not cond:
        sys.exit(f"FAILED {name}: {detail}")


messages = [{"role": "user", "content": "Name three fruits."}]
m = client.messages.create(model=model, max_tokens=24, extra_body=GREEDY, system="You are brief.", messages=messages)
text = m.content[0].text if m.content else ""
check("create", m.type == "message" and m.role == "assistant" and m.model == model
      and len(m.content) == 1 and m.content[0].type == "text" and text and m.id.startswith("msg_"), m)
check("stop_reason", m.stop_reason == ("max_tokens" if m.usage.output_tokens == 24 else "end_turn")
      and m.stop_sequence is None, m)
check("usage", m.usage.input_tokens > 0 and 0 < m.usage.output_tokens <= 24, m.usage)

blocks = client.messages.create(
    model=model, max_tokens=24, extra_body=GREEDY,
    system=[{"type": "text", "text": "You are brief."}],
    messages=[{"role": "user", "content": [{"type": "text", "text": "Name three fruits."}]}],
)
check("system and content as blocks", blocks.content[0].text == text, blocks)

no_system = client.messages.create(model=model, max_tokens=24, extra_body=GREEDY, messages=messages)
check("system changes the prompt", no_system.usage.input_tokens != m.usage.input_tokens, no_system.usage)

with client.messages.stream(model=model, max_tokens=24, extra_body=GREEDY, system="You are brief.",
                            messages=messages) as stream:
    streamed = "".join(stream.text_stream)
    final = stream.get_final_message()
check("stream text_stream", streamed == text, (streamed, text))
check("stream final message", final.content[0].text == text and final.stop_reason == m.stop_reason
      and final.usage.output_tokens == m.usage.output_tokens
      and final.usage.input_tokens == m.usage.input_tokens, final)

events = [e.type for e in client.messages.create(model=model, max_tokens=8, extra_body=GREEDY, messages=messages,
                                                 stream=True)]
# (The SDK drops `ping` events; tests/api.rs checks where the server sends it.)
check("stream event order", events[:2] == ["message_start", "content_block_start"]
      and events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
      and set(events[2:-3]) == {"content_block_delta"}, events)

word = text.split()[1]
s = client.messages.create(model=model, max_tokens=24, extra_body=GREEDY, system="You are brief.", messages=messages,
                           stop_sequences=["never-there", word])
check("stop_sequences", s.stop_reason == "stop_sequence" and s.stop_sequence == word
      and s.content[0].text == text[:text.index(word)], (s, word))

short = client.messages.create(model=model, max_tokens=2, messages=messages, extra_body={"temperature": 0.7, "top_p": 0.9, "top_k": 20})
check("max_tokens", short.stop_reason == "max_tokens" and short.usage.output_tokens == 2, short)

counted = client.messages.count_tokens(model=model, system="You are brief.", messages=messages)
check("count_tokens", counted.input_tokens == m.usage.input_tokens, counted)

prefill = client.messages.create(model=model, max_tokens=8, extra_body=GREEDY, system="You are brief.",
                                 messages=messages + [{"role": "assistant", "content": text[:6]}])
check("assistant prefill continues", prefill.content[0].text and prefill.usage.input_tokens > m.usage.input_tokens,
      prefill)

try:
    anthropic.Anthropic(base_url=root, api_key="wrong-key", max_retries=0).messages.create(
        model=model, max_tokens=4, messages=messages)
    check("wrong API key raises", False, "no error")
except anthropic.AuthenticationError as e:
    check("wrong API key raises", e.status_code == 401 and e.body["type"] == "error"
          and e.body["error"]["type"] == "authentication_error", e.body)

try:
    # The SDK insists on max_tokens itself: send the body by hand through its client.
    client.post("/v1/messages", cast_to=anthropic.types.Message, body={"model": model, "messages": messages})
    check("missing max_tokens raises", False, "no error")
except anthropic.BadRequestError as e:
    check("missing max_tokens raises", e.status_code == 400 and e.body["error"]["type"] == "invalid_request_error"
          and "max_tokens" in e.body["error"]["message"], e.body)

try:
    client.messages.create(model=model, max_tokens=4, messages=messages, extra_body={"temperature": -1})
    check("bad value raises", False, "no error")
except anthropic.BadRequestError as e:
    check("bad value raises", "temperature" in e.body["error"]["message"], e.body)

try:
    client.messages.create(model="claude-no-such-model", max_tokens=4, messages=messages)
    check("unknown model raises", False, "no error")
except anthropic.NotFoundError as e:
    check("unknown model raises", e.status_code == 404 and e.body["error"]["type"] == "not_found_error", e.body)

print(f"ok: {len(checks)} checks: {', '.join(checks)}")
