"""Check that an adapter published by mezo-serve loads in PEFT and gives the server's numbers.

    cargo run -p mezo-server -- serve                 # in one terminal
    pip install torch transformers peft gguf          # the Hugging Face stack (large; not in CI)
    python examples/peft_compare.py --adapter NAME [--version N] [--url http://127.0.0.1:8080]
        [--data-dir data] [--model models/SmolLM2-135M-Instruct.Q4_1.gguf] [--api-key KEY]

The server writes every version as a PEFT folder (`<data dir>/adapters/<name>/v<N>/`) with q/k
`lora_B` rows in Hugging Face's order. This script loads the base model from the same GGUF file
with transformers (dequantized to f32), applies that folder with `PeftModel.from_pretrained`,
computes each test text's next-token log-probs, asks the server for the same log-probs of the
same token ids (`/v1/completions` with `echo`, `max_tokens: 0`, `model: "<name>@<N>"`), and
prints the largest difference per text. It exits 1 if any is above --tolerance (2e-3, what an
f32 forward that is right achieves), so a layout mix-up on either side shows at once.
"""

import argparse
import json
import os
import sys
import urllib.error
import urllib.request

TEXTS = [
    "The capital of France is",
    "Review: the plot is a mess and the acting is worse.\nSentiment:",
    "Review: a gorgeous, witty, seductive movie.\nSentiment:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
]


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def server_json(url, path, body=None, api_key=None):
    request = urllib.request.Request(url.rstrip("/") + path)
    if body is not None:
        request.data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:
        fail(f"{path} answered {err.code}: {err.read().decode(errors='replace')}")
    except urllib.error.URLError as err:
        fail(f"cannot reach the server at {url} ({err.reason}); start it with `mezo serve`")


def live_version(url, adapter, api_key):
    models = server_json(url, "/v1/models", api_key=api_key)["data"]
    for model in models:
        if model["id"] == adapter:
            return model["live_version"]
    names = ", ".join(m["id"] for m in models)
    fail(f"the server has no adapter `{adapter}`; it serves: {names}")


def server_logprobs(url, model, ids, api_key):
    body = {"model": model, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1}
    answer = server_json(url, "/v1/completions", body, api_key)
    return answer["choices"][0]["logprobs"]["token_logprobs"][1:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--adapter", required=True, help="the adapter's name on the server")
    parser.add_argument("--version", type=int, help="the version to check (default: the live one)")
    parser.add_argument("--data-dir", default="data", help="the server's data folder")
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--api-key", default=os.environ.get("MEZO_API_KEY"))
    parser.add_argument("--tolerance", type=float, default=2e-3)
    args = parser.parse_args()

    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        fail(f"{err}; install the Hugging Face stack: pip install torch transformers peft gguf")

    version = args.version or live_version(args.url, args.adapter, args.api_key)
    folder = os.path.join(args.data_dir, "adapters", args.adapter, f"v{version}")
    if not os.path.exists(os.path.join(folder, "adapter_config.json")):
        fail(f"{folder} holds no adapter_config.json; pass the server's --data-dir")
    if not os.path.exists(args.model):
        fail(f"{args.model} is missing; fetch it with `mezo fetch-model` or pass --model")

    gguf_dir, gguf_file = os.path.split(os.path.abspath(args.model))
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    base = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file, torch_dtype=torch.float32
    )
    model = PeftModel.from_pretrained(base, folder).eval()

    served_model = f"{args.adapter}@{version}"
    print(f"{served_model}: PEFT on {folder} against the server at {args.url}")
    worst = 0.0
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        peft_lps = [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
        served = server_logprobs(args.url, served_model, ids, args.api_key)
        difference = max(abs(p - s) for p, s in zip(peft_lps, served))
        worst = max(worst, difference)
        print(f"  {difference:9.2e}  {text[:50]!r}")
    verdict = "agree" if worst <= args.tolerance else "DISAGREE"
    print(f"largest difference {worst:.2e} (tolerance {args.tolerance:.0e}): they {verdict}")
    sys.exit(0 if worst <= args.tolerance else 1)


if __name__ == "__main__":
    main()
