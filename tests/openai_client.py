"""The official `openai` Python client against a running mezo-serve.

Run by tests/openai_client.rs with the server's base URL and API key; exits non-zero with the
failing check's message if anything is off. Usage: python openai_client.py BASE_URL API_KEY
"""

import sys

import openai
from openai import OpenAI

BASE_MODEL = "smollm2-135m-instruct"


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def main(base_url: str, api_key: str) -> None:
    client = OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0)

    ids = [m.id for m in client.models.list().data]
    check(ids[0] == BASE_MODEL and "sentiment" in ids, f"models: {ids}")
    check(client.models.retrieve("sentiment").id == "sentiment", "retrieve an adapter")

    chat = client.chat.completions.create(
        model=BASE_MODEL,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
        ],
        max_tokens=16,
        temperature=0,
    )
    answer = chat.choices[0].message.content
    check(answer and chat.choices[0].message.role == "assistant", f"chat: {chat}")
    check(chat.choices[0].finish_reason in ("stop", "length"), f"finish: {chat}")
    check(chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens, "usage")
    print("chat:", repr(answer))

    chunks = list(
        client.chat.completions.create(
            model="sentiment",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    check(chunks[0].choices[0].delta.role == "assistant", f"first chunk: {chunks[0]}")
    check(all(c.usage is None for c in chunks[:-1]), "usage only on the last chunk")
    last = chunks[-1]
    check(last.choices == [] and last.usage is not None, f"usage chunk: {last}")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(last.usage.completion_tokens >= 1, "streamed tokens counted")
    print("stream:", repr(streamed), last.usage)

    scored = client.completions.create(
        model=BASE_MODEL, prompt="The capital of France is Paris.", max_tokens=0, echo=True, logprobs=1
    )
    lp = scored.choices[0].logprobs
    check(lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:]), f"echo: {lp}")
    print("perplexity tokens:", len(lp.tokens))

    try:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
        raise AssertionError("an unknown model must fail")
    except openai.NotFoundError as err:
        check(err.status_code == 404, f"status {err.status_code}")
        check(err.code == "model_not_found", f"code {err.code}")
        check(err.param == "model", f"param {err.param}")
        print("unknown model:", err.message)

    try:
        client.chat.completions.create(
            model=BASE_MODEL, messages=[{"role": "user", "content": "hi"}], temperature=3
        )
        raise AssertionError("temperature 3 must fail")
    except openai.BadRequestError as err:
        check(err.param == "temperature", f"param {err.param}")

    try:
        OpenAI(base_url=f"{base_url}/v1", api_key="sk-wrong", max_retries=0).models.list()
        raise AssertionError("a wrong key must fail")
    except openai.AuthenticationError as err:
        check(err.status_code == 401, f"status {err.status_code}")

    print("openai", openai.__version__, "ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
