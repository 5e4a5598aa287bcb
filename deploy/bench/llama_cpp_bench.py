#!/usr/bin/env python3
"""llama.cpp baseline throughput for a GGUF model, via llama-cpp-python (CPU).

Dependency (builds llama.cpp from source; several minutes on 2 cores):

    python3 -m venv /work/refenv && /work/refenv/bin/pip install llama-cpp-python numpy

Usage:

    /work/refenv/bin/python deploy/bench/llama_cpp_bench.py --model PATH --threads 2 \
        [--prompt-tokens 128] [--decode-tokens 64]

Measures
  * prompt eval: a fixed, deterministic prompt of exactly --prompt-tokens tokens (BOS, if the
    model adds one, then a repeated English paragraph, cut to length) evaluated in one batch.
    One warm-up run, then one timed run; the model state is reset before each.
  * decode: after a short prompt, greedy (argmax) generation of --decode-tokens tokens, one
    llm.eval([token]) per step (EOS does not stop it). One short warm-up, then one timed run.
    The timing includes the Python eval overhead and the argmax over the vocabulary.

Prints exactly one JSON line on stdout:
  {"engine":"llama.cpp","model":...,"threads":N,"prompt_tokens":...,"prompt_tokens_per_s":...,
   "decode_tokens":...,"decode_tokens_per_s":...}
"""

import argparse
import json
import os
import time

import llama_cpp
import numpy as np
from llama_cpp import Llama

PARAGRAPH = (
    "The history of the river valley is long and full of small surprises. Farmers planted "
    "wheat and barley along the banks, merchants carried salt and copper upstream, and every "
    "spring the water rose to cover the low fields with fresh silt. Travellers wrote about the "
    "bridges, the markets, the songs of the boatmen, and the old stone tower that watched over "
    "the ford. "
)
SHORT_PROMPT = "Once upon a time, in a small village by the sea,"


def make_prompt(llm, n):
    text = PARAGRAPH
    while True:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        if len(ids) >= n:
            return ids[:n]
        text += PARAGRAPH


def last_logits(llm):
    # llama-cpp-python >= 0.3.x no longer copies logits into llm.scores unless logits_all=True,
    # so read the last row straight from the llama.cpp context (no copy).
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def greedy_decode(llm, prompt_ids, n):
    llm.reset()
    llm.eval(prompt_ids)
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(np.argmax(last_logits(llm)))
        llm.eval([tok])
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description="llama.cpp (llama-cpp-python) throughput baseline")
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    args = ap.parse_args()

    n_ctx = 1024
    llm = Llama(
        model_path=args.model,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=n_ctx,
        n_batch=max(512, args.prompt_tokens),
        n_ubatch=max(512, args.prompt_tokens),
        seed=0,
        verbose=False,
    )

    prompt = make_prompt(llm, args.prompt_tokens)
    assert len(prompt) == args.prompt_tokens
    llm.reset()
    llm.eval(prompt)  # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    pp_s = time.perf_counter() - t0

    short = llm.tokenize(SHORT_PROMPT.encode("utf-8"), add_bos=True, special=False)
    assert len(short) + args.decode_tokens <= n_ctx
    greedy_decode(llm, short, min(8, args.decode_tokens))  # warm-up
    tg_s = greedy_decode(llm, short, args.decode_tokens)

    print(
        json.dumps(
            {
                "engine": "llama.cpp",
                "model": os.path.basename(args.model),
                "threads": args.threads,
                "prompt_tokens": args.prompt_tokens,
                "prompt_tokens_per_s": round(args.prompt_tokens / pp_s, 2),
                "decode_tokens": args.decode_tokens,
                "decode_tokens_per_s": round(args.decode_tokens / tg_s, 2),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
