"""Drives a shoal node with LangChain's `ChatOpenAI` (the langchain-openai package), unmodified.

Usage: python3 tests/clients/langchain_client.py BASE_URL MODEL API_KEY
Exits non-zero (with the failing check) when LangChain's results differ from what the node
answers the official `openai` SDK. Run by tests/langchain_openai.rs against `shoal run --listen`.
"""

import sys

import openai
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
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

print(f"ok: {len(checks)} checks: {', '.join(checks)}")
