"""Drives a shoal node with LangChain's `ChatOpenAI` (the langchain-openai package), unmodified.

Also: `bind_tools` (a named function and "any", invoked and streamed, then a tool result round
trip) and `with_structured_output` (json_schema, function_calling, json_mode).

Usage: python3 tests/clients/langchain_client.py BASE_URL MODEL API_KEY
Exits non-zero (with the failing check) when LangChain's results differ from what the node
answers the official `openai` SDK. Run by tests/langchain_openai.rs against `shoal run --listen`.
"""

import sys
from typing import Literal

import openai
import pydantic
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

base_url, model, key = sys.argv[1], sys.argv[2], sys.argv[3]
checks = []


def check(name, cond, detail=""):
    checks.append(name)
    if not cond:
        sys.exit(f"FAILED {name}: {detail}")


sdk = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)
llm = ChatOpenAI(base_url=base_url, api_key=key, model=model, temperature=0, max_tokens=24, max_retries=0,
                 timeout=120)
conversation = [SystemMessage("You are brief."), HumanMessage("Name three fruits.")]
want = sdk.chat.completions.create(
    model=model, max_tokens=24, temperature=0,
    messages=[{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name three fruits."}],
)
text = want.choices[0].message.content

r = llm.invoke(conversation)
check("invoke", isinstance(r, AIMessage) and r.content == text, (r, text))
check("invoke metadata", r.response_metadata.get("finish_reason") == want.choices[0].finish_reason
      and r.response_metadata.get("model_name") == model, r.response_metadata)
check("invoke usage", r.usage_metadata is not None
      and r.usage_metadata["input_tokens"] == want.usage.prompt_tokens
      and r.usage_metadata["output_tokens"] == want.usage.completion_tokens, r.usage_metadata)

plain = llm.invoke("Name three fruits.")
check("invoke a string", isinstance(plain.content, str) and plain.content, plain)

chunks = list(ChatOpenAI(base_url=base_url, api_key=key, model=model, temperature=0, max_tokens=24, max_retries=0,
                         timeout=120, stream_usage=True).stream(conversation))
streamed = "".join(c.content for c in chunks)
check("stream", len(chunks) > 2 and streamed == text, (streamed, text))
total = chunks[0]
for c in chunks[1:]:
    total = total + c
check("stream usage", total.usage_metadata is not None
      and total.usage_metadata["output_tokens"] == want.usage.completion_tokens, total.usage_metadata)
check("stream finish", total.response_metadata.get("finish_reason") == want.choices[0].finish_reason,
      total.response_metadata)

word = text.split()[1]
stopped = llm.invoke(conversation, stop=[word])
check("stop", stopped.content == text[:text.index(word)], (stopped.content, word))

multi = llm.invoke(conversation + [AIMessage(text), HumanMessage("And three colors?")])
check("multi-turn", isinstance(multi.content, str) and multi.content
      and multi.usage_metadata["input_tokens"] > want.usage.prompt_tokens, multi)

sampled = ChatOpenAI(base_url=base_url, api_key=key, model=model, temperature=0.9, seed=5, max_tokens=12,
                     max_retries=0, timeout=120)
check("seeded sampling", sampled.invoke(conversation).content == sampled.invoke(conversation).content)

batch = llm.batch([conversation, [HumanMessage("Name a color.")]])
check("batch", len(batch) == 2 and batch[0].content == text and batch[1].content, batch)



@tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    """The weather in a city."""
    return f"18 degrees {unit} in {city}"


# Calls and JSON need more than the 24 tokens above.
llm = ChatOpenAI(base_url=base_url, api_key=key, model=model, temperature=0, max_tokens=120, max_retries=0,
                 timeout=120)
ask = [HumanMessage("What is the weather in Paris?")]
for choice in ("get_weather", "any"):
    m = llm.bind_tools([get_weather], tool_choice=choice).invoke(ask)
    calls = m.tool_calls
    check(f"bind_tools {choice}", len(calls) >= 1 and calls[0]["name"] == "get_weather"
          and set(calls[0]["args"]) == {"city", "unit"} and calls[0]["args"]["unit"] in ("celsius", "fahrenheit"), m)

bound = llm.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False)
total = None
for c in bound.stream(ask):
    total = c if total is None else total + c
def name_args(m):
    return [(c["name"], c["args"]) for c in m.tool_calls]


check("bind_tools stream", name_args(total) == name_args(bound.invoke(ask)) and len(total.tool_calls) == 1, total)

call = total.tool_calls[0]
answer = llm.invoke(ask + [total, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])])
check("tool round trip", isinstance(answer.content, str) and answer.content and not answer.tool_calls, answer)


class Fruit(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    color: Literal["red", "yellow", "green"]
    sweet: bool


for method in ("json_schema", "function_calling"):
    fruit = llm.with_structured_output(Fruit, method=method).invoke(
        "Describe a banana as JSON with a name, a color and whether it is sweet.")
    check(f"with_structured_output {method}", isinstance(fruit, Fruit), fruit)
# JSON mode only asks for an object (no schema): a dict comes back.
obj = llm.with_structured_output(None, method="json_mode").invoke("Give a JSON object with one key, name, for a banana.")
check("with_structured_output json_mode", isinstance(obj, dict), obj)

print(f"ok: {len(checks)} checks: {', '.join(checks)}")
