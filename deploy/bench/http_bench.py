#!/usr/bin/env python3
"""Chat completions through the official `openai` client, side by side: our HTTP API (the
default dreaming turn, and the same pipeline with the dream and revisions off) against
llama.cpp's OpenAI-compatible server (llama-cpp-python) on the same GGUF, one request at a
time, the same prompts and `max_tokens`.

Usage (the venv from deploy/python-env.sh has both packages):

    target/release/mm up &                                   # our API on 127.0.0.1:50080
    python -m llama_cpp.server --model <SmolLM2 GGUF> --port 8011 --n_threads 2 &
    python deploy/bench/http_bench.py --ours http://127.0.0.1:50080/v1 \
        --llama http://127.0.0.1:8011/v1 [--requests 6] [--max-tokens 64]

Prints one JSON line per configuration: mean and median latency per request, completion
tokens per second of wall time, and (streaming) the time to the first content chunk and, for
ours, to the first dream event.
"""

import argparse
import json
import statistics
import time

import openai

PROMPTS = [
    "Write a haiku about the sea.",
    "Describe a lighthouse at dawn in two sentences.",
    "Tell me a very short story about a lost key.",
    "What does the wind say to the mountains?",
    "Write two lines about autumn rain.",
    "Describe the smell of an old library.",
]


def run(client, model, extra, n, max_tokens, stream):
    latencies, tokens, first, first_dream = [], 0, [], []
    for i in range(n):
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        t0 = time.perf_counter()
        if stream:
            got_first = got_dream = None
            s = client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, seed=i, stream=True,
                stream_options={"include_usage": True}, extra_body=extra)
            for chunk in s:
                if got_first is None and chunk.choices and chunk.choices[0].delta.content:
                    got_first = time.perf_counter() - t0
                if got_dream is None and (chunk.model_extra or {}).get("x_dream"):
                    got_dream = time.perf_counter() - t0
                if chunk.usage:
                    tokens += chunk.usage.completion_tokens
            first.append(got_first or 0.0)
            if got_dream is not None:
                first_dream.append(got_dream)
        else:
            r = client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, seed=i, extra_body=extra)
            tokens += r.usage.completion_tokens
        latencies.append(time.perf_counter() - t0)
    out = {
        "requests": n,
        "mean_s": round(statistics.mean(latencies), 3),
        "median_s": round(statistics.median(latencies), 3),
        "completion_tokens_per_s": round(tokens / sum(latencies), 2),
    }
    if stream:
        out["first_content_s"] = round(statistics.mean(first), 3)
    if first_dream:
        out["first_dream_event_s"] = round(statistics.mean(first_dream), 3)
    if tokens == 0:
        out["completion_tokens_per_s"] = None  # the server reported no usage
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", default="http://127.0.0.1:50080/v1")
    ap.add_argument("--llama", default=None)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    ours = openai.OpenAI(base_url=a.ours, api_key="-", max_retries=0, timeout=600)
    model = ours.models.list().data[0].id
    configs = [
        ("ours: default dream (2 attempts, critique each)", ours, model, None, False),
        ("ours: default dream, streamed", ours, model, None, True),
        ("ours: plain sampling, one attempt (critique kept)", ours, model,
         {"dream": {"schedule": "off", "max_attempts": 1}}, False),
    ]
    if a.llama:
        llama = openai.OpenAI(base_url=a.llama, api_key="-", max_retries=0, timeout=600)
        lmodel = llama.models.list().data[0].id
        configs += [
            ("llama.cpp server: plain sampling", llama, lmodel, None, False),
            ("llama.cpp server: plain sampling, streamed", llama, lmodel, None, True),
        ]
    for name, client, m, extra, stream in configs:
        r = run(client, m, extra, a.requests, a.max_tokens, stream)
        print(json.dumps({"config": name, **r}), flush=True)


if __name__ == "__main__":
    main()
