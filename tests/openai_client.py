"""The official `openai` Python client against a running mezo-serve.

Run by tests/openai_client.rs with the server's base URL and API key; exits non-zero with the
failing check's message if anything is off. Usage: python openai_client.py BASE_URL API_KEY
"""

import io
import json
import sys
import time

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

    fine_tuning(client)

    print("openai", openai.__version__, "ok")


def fine_tuning(client: OpenAI) -> None:
    """Upload chat examples, fine-tune, follow the job, and chat with the fine-tuned model."""
    lines = [
        {"messages": [{"role": "user", "content": f"What is the code word {i}?"},
                      {"role": "assistant", "content": "Mezo."}]}
        for i in range(6)
    ]
    data = "\n".join(json.dumps(line) for line in lines).encode()
    uploaded = client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune")
    check(uploaded.id.startswith("file-") and uploaded.bytes == len(data), f"file: {uploaded}")
    check(client.files.retrieve(uploaded.id).filename == "train.jsonl", "retrieve a file")
    check(uploaded.id in [f.id for f in client.files.list().data], "list files")
    check(client.files.content(uploaded.id).read() == data, "file content")

    job = client.fine_tuning.jobs.create(
        model=BASE_MODEL,
        training_file=uploaded.id,
        suffix="codeword",
        seed=3,
        hyperparameters={"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 2},
    )
    check(job.status in ("queued", "running") and job.id.startswith("ftjob-"), f"job: {job}")
    check(job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 2, f"{job}")
    deadline = time.time() + 300
    while job.status in ("queued", "running"):
        check(time.time() < deadline, f"the job did not finish: {job}")
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    check(job.status == "succeeded", f"job ended {job.status}: {job.error}")
    model = job.fine_tuned_model
    check(model == f"ft:{BASE_MODEL}:codeword:" + model.rsplit(":", 1)[-1], f"model id {model}")
    check(job.id in [j.id for j in client.fine_tuning.jobs.list(limit=5).data], "list jobs")

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    check(len(metrics) == 6, f"one metrics event per step (2 epochs x 3 steps): {len(metrics)}")
    check(events[0].created_at >= events[-1].created_at, "events newest first")
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    steps = sorted(c.step_number for c in checkpoints)
    check(steps == [3, 6], f"a checkpoint per epoch: {steps}")

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the code word?"}],
        max_tokens=8, temperature=0,
    )
    check(chat.model == model and chat.choices[0].message.content, f"chat with {model}: {chat}")
    check(model in [m.id for m in client.models.list().data], "the fine-tuned model is listed")
    print("fine-tuned:", model, repr(chat.choices[0].message.content))

    try:
        client.fine_tuning.jobs.cancel(job.id)
        raise AssertionError("cancelling a finished job must fail")
    except openai.ConflictError as err:
        check(err.status_code == 409, f"status {err.status_code}")
    try:
        client.fine_tuning.jobs.create(model=BASE_MODEL, training_file="file-missing")
        raise AssertionError("an unknown file must fail")
    except openai.BadRequestError as err:
        check(err.param == "training_file", f"param {err.param}")
    check(client.files.delete(uploaded.id).deleted, "delete a file")
    try:
        client.files.retrieve(uploaded.id)
        raise AssertionError("a deleted file must be gone")
    except openai.NotFoundError:
        pass


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
