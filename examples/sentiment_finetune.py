"""Fine-tune a sentiment adapter with MeZO on a running mezo-serve, and measure it before and after.

    cargo run -p mezo-server -- serve                 # in one terminal
    python examples/sentiment_finetune.py [--url http://127.0.0.1:8080] [--data FILE]
        [--train 256] [--test 200] [--steps 200] [--adapter sentiment-demo] [--api-key KEY]

It reads labelled movie-review snippets (`id<TAB>rating<TAB>text`, ratings in [-4, 4]; >= 1 is
positive, <= -1 negative, the rest dropped), asks the base model for each held-out review's
sentiment through `/v1/chat/completions`, posts a classification job to `POST /v1/finetune`
(the same chat messages, candidates "negative"/"positive"), follows its event stream, then asks
again with the adapter as the model and prints the accuracies, the job's held-out metrics and the
adapter's published versions. Needs only the `openai` package (`pip install openai`).
An existing adapter of the same name is trained further from its live version.
"""

import argparse
import json
import os
import random
import sys
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
from openai import OpenAI

QUESTION = "Review: {}\nIs the sentiment of this review positive or negative? Answer with one word."
CANDIDATES = ["negative", "positive"]


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def load_reviews(path):
    """[(text, label)] with label 1 for positive and 0 for negative reviews."""
    if not os.path.exists(path):
        fail(
            f"{path} not found. Fetch it with `cargo run -p mezo-server -- bench mezo --steps 1`:\n"
            "the MeZO benchmark first downloads the movie-review snippets (VADER's ground truth, from\n"
            "the vaderSentiment 3.3.2 sdist on PyPI) into data/, and one step is enough to get the\n"
            "file (`cargo run -p mezo-server -- fetch-data` fetches only the data)."
        )
    reviews = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.strip().split("\t")
            if len(parts) != 3 or not parts[2].strip():
                continue
            try:
                rating = float(parts[1])
            except ValueError:
                continue  # a header or a damaged line
            if rating >= 1:
                reviews.append((parts[2].strip(), 1))
            elif rating <= -1:
                reviews.append((parts[2].strip(), 0))
    return reviews


class Server:
    """Plain HTTP for the mezo-specific endpoints; errors print the server's message and exit."""

    def __init__(self, url, api_key):
        self.url = url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def open(self, method, path, body=None, timeout=60):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data, self.headers, method=method)
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as err:
            text = err.read().decode(errors="replace")
            try:
                message = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = text or err.reason
            fail(f"{method} {path}: HTTP {err.code}: {message}")
        except urllib.error.URLError as err:
            fail(f"cannot reach {self.url}: {err.reason}")

    def json(self, method, path, body=None):
        with self.open(method, path, body) as response:
            return json.load(response)

    def events(self, job_id):
        """The job's events as they happen, until the stream's `[DONE]`."""
        # The server pings every 15 s, so a long silence means the connection is gone.
        with self.open("GET", f"/v1/finetune/{job_id}/events?stream=true", timeout=120) as stream:
            for raw in stream:
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data:"):
                    continue  # blank separators and `: ping` comments
                payload = line[len("data:"):].strip()
                if payload == "[DONE]":
                    return
                yield json.loads(payload)


def predict(client, model, text):
    """1 (positive), 0 (negative) or None, from the first answer token's top logprobs."""
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION.format(text)}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=20,
    )
    choice = reply.choices[0]
    best = {}
    if choice.logprobs and choice.logprobs.content:
        for top in choice.logprobs.content[0].top_logprobs:
            word = top.token.strip().lower()
            for label, prefix in ((1, "pos"), (0, "neg")):
                if word.startswith(prefix):
                    best[label] = max(best.get(label, float("-inf")), top.logprob)
    if best:
        return max(best, key=best.get)
    answer = (choice.message.content or "").lower()
    if "positive" in answer:
        return 1
    if "negative" in answer:
        return 0
    return None


def accuracy(client, model, reviews):
    with ThreadPoolExecutor(4) as pool:
        predictions = list(pool.map(lambda r: predict(client, model, r[0]), reviews))
    return sum(p == label for p, (_, label) in zip(predictions, reviews)) / len(reviews)


def examples(reviews):
    return [
        # The server renders `messages` with the model's chat template, exactly as for the chat
        # requests made at test time, and scores each candidate as the assistant's reply.
        {"messages": [{"role": "user", "content": QUESTION.format(text)}], "candidates": CANDIDATES, "label": label}
        for text, label in reviews
    ]


def describe(point):
    if not point:
        return "-"
    metrics = " ".join(f"{k}={v:.3f}" for k, v in sorted(point.get("metrics", {}).items()))
    return f"step {point['steps_done']}: loss={point['loss']:.4f} {metrics}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the server's base URL")
    parser.add_argument("--data", default="data/movieReviewSnippets_GroundTruth.txt")
    parser.add_argument("--train", type=int, default=256, help="training reviews")
    parser.add_argument("--test", type=int, default=200, help="held-out test reviews")
    parser.add_argument("--steps", type=int, default=200, help="MeZO steps")
    parser.add_argument("--adapter", default="sentiment-demo", help="adapter to train (and serve)")
    parser.add_argument("--api-key", default=os.environ.get("MEZO_API_KEY"),
                        help="bearer token if the server has api_keys (default: $MEZO_API_KEY)")
    args = parser.parse_args()

    reviews = load_reviews(args.data)
    random.Random(0).shuffle(reviews)
    test = reviews[: args.test]
    train = reviews[args.test: args.test + args.train]
    evals = reviews[args.test + args.train: args.test + args.train + 100]
    if not test or not train:
        fail(f"{args.data} has {len(reviews)} labelled reviews, too few for --test and --train")
    print(f"{len(reviews)} labelled reviews: {len(train)} train, {len(evals)} eval, {len(test)} test")

    server = Server(args.url, args.api_key)
    client = OpenAI(base_url=server.url + "/v1", api_key=args.api_key or "none")
    try:
        models = client.models.list().data
        base = next((m.id for m in models if getattr(m, "parent", None) is None), models[0].id)
        print(f"base model {base}: asking {len(test)} test reviews ...")
        before = accuracy(client, base, test)
        print(f"zero-shot accuracy: {before:.3f}")

        job = server.json("POST", "/v1/finetune", {
            "adapter": args.adapter,
            "objective": "classification",
            "examples": examples(train),
            **({"eval_examples": examples(evals)} if evals else {}),
            # The trainer's defaults otherwise (README, "MeZO").
            "hyperparameters": {"max_steps": args.steps, "batch_size": min(16, len(train)),
                                "eval_every": 50},
            "publish_every": 50,
        })
        print(f"job {job['id']} {job['status']}: training {job['adapter']} for {args.steps} steps")
        for event in server.events(job["id"]):
            step = (event.get("data") or {}).get("step")
            if event["type"] != "step" or (step is not None and step % 10 == 0):
                print(f"  [{event['type']}] {event['message']}")
        job = server.json("GET", f"/v1/finetune/{job['id']}")
        if job["status"] != "succeeded":
            fail(f"job {job['id']} {job['status']}: {(job.get('error') or {}).get('message', '')}")

        print(f"adapter {args.adapter}: asking {len(test)} test reviews ...")
        after = accuracy(client, args.adapter, test)
    except openai.APIError as err:
        fail(f"{server.url}/v1/chat/completions: {err.message}")

    print(f"\n{'model':<32} {'test accuracy':>13}")
    print(f"{base:<32} {before:>13.3f}")
    print(f"{args.adapter:<32} {after:>13.3f}")
    progress = job["progress"]
    print(f"\nheld-out before: {describe(progress.get('held_out_before'))}")
    print(f"held-out after:  {describe(progress.get('held_out'))}")

    adapter = server.json("GET", f"/v1/adapters/{urllib.parse.quote(args.adapter, safe='')}")
    print(f"\n{'version':>7} {'step':>6} {'held-out accuracy':>17} {'live':>5}")
    for v in adapter["versions"]:
        acc = ((v.get("held_out") or {}).get("metrics") or {}).get("accuracy")
        step = "-" if v.get("step") is None else v["step"]
        print(f"{v['version']:>7} {step:>6} {'-' if acc is None else f'{acc:.3f}':>17} "
              f"{'yes' if v['live'] else '':>5}")


if __name__ == "__main__":
    main()
