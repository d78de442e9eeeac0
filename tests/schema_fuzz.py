"""Schema fuzzing: schemathesis generates requests from a running server's own /openapi.json.

Run by tests/schema_fuzz.rs as `python schema_fuzz.py BASE_URL REPORT_DIR`. It first gives the
server one of everything (an uploaded file, a finished MeZO job and its adapter, an OpenAI job,
an answer to rate), so that operations on ids reach their logic rather than a 404, then runs
`schemathesis run` with a fixed seed and budget and exits with its status.

Imported by schemathesis (SCHEMATHESIS_HOOKS=schema_fuzz), the same file is the hook that puts a
served model's name into most generated `model` fields: random names would only ever get 404,
and the point is to drive the engine with every sampling field the schema allows.
"""

import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import requests

MODELS_ENV = "MEZO_FUZZ_MODELS"
COMPLETION_ENV = "MEZO_FUZZ_COMPLETION_ID"
EXAMPLES_PER_OPERATION = 30
SEED = 1


def seed_resources(base: str) -> dict:
    """One of each resource; returns the ids the fuzzer's operations take."""
    model = requests.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
    chat = {
        "messages": [
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "Hi!"},
        ]
    }
    upload = requests.post(
        f"{base}/v1/files",
        files={"file": ("train.jsonl", "\n".join(json.dumps(chat) for _ in range(4)))},
        data={"purpose": "fine-tune"},
        timeout=30,
    )
    upload.raise_for_status()
    file_id = upload.json()["id"]
    examples = [
        {"prompt": f"Example {i}:", "candidates": [" yes", " no"], "label": i % 2}
        for i in range(4)
    ]
    job = requests.post(
        f"{base}/v1/finetune",
        json={
            "adapter": "fuzzed",
            "objective": "classification",
            "examples": examples,
            "hyperparameters": {"max_steps": 2},
        },
        timeout=30,
    )
    job.raise_for_status()
    job_id = job.json()["id"]
    deadline = time.time() + 300
    while requests.get(f"{base}/v1/finetune/{job_id}", timeout=30).json()["status"] != "succeeded":
        if time.time() > deadline:
            raise SystemExit(f"the seed job {job_id} did not succeed in 300 s")
        time.sleep(0.5)
    openai_job = requests.post(
        f"{base}/v1/fine_tuning/jobs",
        json={"model": model, "training_file": file_id, "hyperparameters": {"n_epochs": 1}},
        timeout=30,
    )
    openai_job.raise_for_status()
    answer = requests.post(
        f"{base}/v1/chat/completions",
        json={"model": model, "messages": chat["messages"][:1], "max_tokens": 4},
        timeout=60,
    )
    answer.raise_for_status()
    return {
        "model": model,
        "adapter": "fuzzed",
        "file": file_id,
        "job": job_id,
        "openai_job": openai_job.json()["id"],
        "completion": answer.json()["id"],
    }


def config(ids: dict) -> str:
    """schemathesis.toml: the seeded ids for the operations that take them."""
    operations = [
        ("^/v1/models/", {"id": ids["model"]}),
        ("^/v1/finetune/", {"id": ids["job"]}),
        ("^/v1/fine_tuning/jobs/", {"id": ids["openai_job"]}),
        ("^/v1/files/", {"id": ids["file"]}),
        ("^/v1/adapters/", {"name": ids["adapter"]}),
        ("^/v1/feedback$", {"adapter": ids["adapter"]}),
    ]
    lines = []
    for regex, parameters in operations:
        values = ", ".join(f"{key} = {json.dumps(value)}" for key, value in parameters.items())
        lines += ["[[operations]]", f"include-path-regex = {json.dumps(regex)}", f"parameters = {{ {values} }}", ""]
    # The coverage phase's walk of the chat body's schema crashes Hypothesis under CPython 3.11
    # ("AST constructor recursion depth mismatch", a tool error, no check failed); chat keeps the
    # examples, fuzzing and stateful phases.
    lines += [
        "[[operations]]",
        'include-path = "/v1/chat/completions"',
        "phases.coverage.enabled = false",
        "",
    ]
    return "\n".join(lines)


def main(base: str, report_dir: str) -> int:
    ids = seed_resources(base)
    report = Path(report_dir)
    report.mkdir(parents=True, exist_ok=True)
    config_file = report / "schemathesis.toml"
    config_file.write_text(config(ids))
    env = dict(
        os.environ,
        SCHEMATHESIS_HOOKS="schema_fuzz",
        PYTHONPATH=str(Path(__file__).parent),
        **{MODELS_ENV: json.dumps([ids["model"], ids["adapter"]]), COMPLETION_ENV: ids["completion"]},
    )
    schemathesis = Path(sys.executable).parent / "schemathesis"
    command = [
        str(schemathesis),
        "--config-file", str(config_file),
        "run", f"{base}/openapi.json",
        # Every check but one: `positive_data_acceptance` expects any schema-valid request to
        # succeed, and this API validates what a schema cannot say (a file must be chat
        # JSONL, a training file must exist, a prompt must fit the context).
        "--exclude-checks", "positive_data_acceptance",
        "--max-examples", str(EXAMPLES_PER_OPERATION),
        "--seed", str(SEED),
        "--workers", "2",
        "--request-timeout", "120",
        "--suppress-health-check", "all",
        "--report", os.environ.get("MEZO_FUZZ_REPORTS", "junit"), "--report-dir", str(report),
    ]
    print("$", " ".join(command), flush=True)
    for attempt in (1, 2):
        run = subprocess.run(command, env=env, cwd=report, capture_output=True, text=True)
        print(run.stdout, run.stderr, sep="\n", flush=True)
        # schemathesis' own crashes (a "Runtime Error" with no failed check, such as CPython
        # 3.11's "AST constructor recursion depth mismatch" inside Hypothesis) say nothing about
        # the server: run once more. A failed check is never retried.
        tool_crash = run.returncode != 0 and "Failures:" not in run.stdout and "Runtime Error" in run.stdout
        if not tool_crash or attempt == 2:
            return run.returncode
        print("schemathesis itself crashed (no check failed); running it once more", flush=True)
    return 1


try:
    import schemathesis

    # Hypothesis describes deeply nested strategies recursively; room to do so keeps CPython from
    # the recursion limit, near which its compiler can fail ("AST constructor recursion depth").
    sys.setrecursionlimit(20_000)
    _SERVED = json.loads(os.environ.get(MODELS_ENV, "[]"))

    @schemathesis.hook
    def map_body(context, body):
        """Most `model` strings become a served model (an eighth stay random, for the 404 path);
        `completion_id` becomes the id of an answer the server gave."""
        if isinstance(body, dict):
            model = body.get("model")
            if _SERVED and isinstance(model, str):
                pick = zlib.crc32(model.encode("utf-8", "surrogatepass"))
                if not model or pick % 8 != 0:
                    body["model"] = _SERVED[pick % len(_SERVED)]
            if isinstance(body.get("completion_id"), str) and os.environ.get(COMPLETION_ENV):
                body["completion_id"] = os.environ[COMPLETION_ENV]
        return body
except ImportError:
    pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
