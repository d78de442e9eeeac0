"""The official `openai` Python client against mezo-serve.

    cargo run -p mezo-server -- serve          # in one terminal
    pip install openai                          # or use the .venv that `bash tests/setup` makes
    python examples/openai_chat.py [BASE_URL] [MODEL]

MODEL may be the base model, an adapter name (its live version) or `name@version`.
"""

import sys

from openai import OpenAI

base_url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
model = sys.argv[2] if len(sys.argv) > 2 else "smollm2-135m-instruct"
# Any key works unless the server was started with api_keys (then use one of them).
client = OpenAI(base_url=f"{base_url}/v1", api_key="sk-local")

print("models:", [m.id for m in client.models.list().data])

reply = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Give me one tip for writing clear code."}],
    max_tokens=64,
    temperature=0,
)
print("answer:", reply.choices[0].message.content)
print("usage:", reply.usage, "| fingerprint:", reply.system_fingerprint)

print("streamed: ", end="", flush=True)
for chunk in client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Count from one to five."}],
    max_tokens=32,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    elif chunk.usage:
        print(f"\n({chunk.usage.completion_tokens} tokens)")
