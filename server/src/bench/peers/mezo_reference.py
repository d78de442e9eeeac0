"""The MeZO paper's reference step, as `mezo bench mezo --peer` measures it.

PyTorch + transformers + peft, run the way the paper's code (princeton-nlp/MeZO, large_models/
trainer.py) runs a step: LoRA r=8, alpha=16 on q_proj and v_proj; the parameters perturbed in
place by +eps, -2eps, +eps, each z regenerated from the step's seed (torch.manual_seed + torch.normal
per parameter); the update regenerates z once more. The loss is the paper's classification loss:
each example's candidates are scored by the mean log-probability of their tokens after the prompt,
one padded row per (example, candidate), and the loss is the cross-entropy over candidates.
Weights are the same GGUF, dequantized to f32 by transformers (the paper's fp16 does not run on
this CPU's PyTorch at speed, and round-trips badly, DESIGN.md section 2).

Input: a JSON file (argv[1]) with the model path, the thread count, eps, lr, the number of steps
and the batches as token ids (the Rust side tokenizes, so both sides see the same tokens).
Output: one JSON line on stdout with the median times and the peak resident memory.
"""

import json
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def load(spec):
    torch.set_num_threads(spec["threads"])
    model_dir, gguf_file = os.path.split(os.path.abspath(spec["model"]))
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, gguf_file=gguf_file, dtype=torch.float32
    )
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.eval()
    return model


def padded(batch, pad_id):
    """One right-padded row per (example, candidate), and where each candidate's tokens are."""
    rows, spans = [], []
    for example in batch:
        for candidate in example["candidates"]:
            rows.append(example["prompt"] + candidate)
            spans.append((len(example["prompt"]), len(candidate)))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    labels = torch.tensor([e["label"] for e in batch])
    return input_ids, attention_mask, spans, labels


@torch.inference_mode()
def zo_forward(model, inputs):
    """The paper's forward with option lengths: cross-entropy over candidates' mean log-probs."""
    input_ids, attention_mask, spans, labels = inputs
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    log_probs = F.log_softmax(logits[:, :-1], dim=-1)
    token_lp = torch.gather(log_probs, -1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    scores = torch.stack(
        [token_lp[i, start - 1 : start - 1 + n].mean() for i, (start, n) in enumerate(spans)]
    ).view(len(labels), -1)
    return F.cross_entropy(scores, labels).item()


def perturb(params, seed, scale, eps):
    torch.manual_seed(seed)
    for _, p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), dtype=p.data.dtype)
        p.data = p.data + scale * z * eps


def zo_step(model, params, inputs, eps, lr, rng):
    seed = int(rng.integers(1_000_000_000))
    perturb(params, seed, 1, eps)
    loss_plus = zo_forward(model, inputs)
    perturb(params, seed, -2, eps)
    loss_minus = zo_forward(model, inputs)
    projected_grad = (loss_plus - loss_minus) / (2 * eps)
    perturb(params, seed, 1, eps)
    torch.manual_seed(seed)
    for _, p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), dtype=p.data.dtype)
        p.data = p.data - lr * projected_grad * z
    return loss_plus


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    model = load(spec)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    pad_id = model.config.eos_token_id or 0
    if isinstance(pad_id, list):
        pad_id = pad_id[0]
    batches = [padded(b, pad_id) for b in spec["batches"]]

    forwards = []
    for inputs in batches:
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            zo_forward(model, inputs)
            best = min(best, time.perf_counter() - start)
        forwards.append(best)
    print(f"reference forward of each batch: {forwards}", file=sys.stderr)

    rng = np.random.default_rng(spec["seed"])
    steps = []
    for i in range(spec["steps"]):
        start = time.perf_counter()
        loss = zo_step(model, params, batches[i % len(batches)], spec["epsilon"], spec["lr"], rng)
        steps.append(time.perf_counter() - start)
        print(f"reference step {i + 1}: loss {loss:.4f}, {steps[-1]:.3f} s", file=sys.stderr)

    print(
        json.dumps(
            {
                "versions": {
                    "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__,
                    "peft": __import__("peft").__version__,
                },
                "threads": torch.get_num_threads(),
                "forward_seconds": float(np.median(forwards)),
                "step_seconds": float(np.median(steps)),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
