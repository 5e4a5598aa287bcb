"""The official `openai` client, unmodified, against the orchestrator's HTTP API.

Usage: python openai_client.py BASE_URL   (e.g. http://127.0.0.1:50080)

Lists models, gets a completion, streams one, continues a session by id, provokes two
OpenAI-shaped 4xx errors, and checks that /metrics parses and counts each turn. Prints one
JSON line of findings on stdout (the Rust test checks the store against it); exits non-zero
with a message on the first failure.
"""

import json
import sys
import urllib.request

import openai
from prometheus_client.openmetrics.parser import text_string_to_metric_families

base = sys.argv[1].rstrip("/")
client = openai.OpenAI(base_url=base + "/v1", api_key="any-token-for-now", max_retries=0)
# A short dream keeps the test quick on a small CPU.
QUICK = {"bursts": 2, "steps": 3, "commit_tokens": 12, "max_attempts": 1}


def check(ok, what):
    if not ok:
        sys.exit(f"FAILED: {what}")


def turns_ok():
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "mm_turns_total" and s.labels.get("outcome") == "ok":
                return s.value
    return 0.0


found = {}

models = [m.id for m in client.models.list().data]
check(any(m.startswith("muse=") and "+majordomo=" in m for m in models), f"a model pair in {models}")
pair = next(m for m in models if m.startswith("muse="))
found["model"] = pair

before = turns_ok()
first = client.chat.completions.create(
    model=pair,
    messages=[
        # Long enough (over 32 tokens, the muse's prime chunk) for the next turn to reuse.
        {"role": "system", "content": "You are a poet of the coast: you write short, plain lines about the sea, its weather and the people who work on it."},
        {"role": "user", "content": "Write one line about the sea."},
    ],
    max_tokens=32,
    seed=7,
    extra_body={"dream": QUICK},
)
text = first.choices[0].message.content
check(isinstance(text, str) and text.strip(), f"a non-empty completion, got {text!r}")
check(first.choices[0].finish_reason in ("stop", "length"), "a finish reason")
check(first.usage.prompt_tokens > 0 and first.usage.completion_tokens > 0, f"usage {first.usage}")
session = (first.model_extra or {}).get("session_id")
check(session, "the response names its session")
dream = (first.model_extra or {}).get("x_dream") or {}
check(dream.get("latent_steps", 0) > 0, f"x_dream counts latent steps: {dream}")
check(turns_ok() == before + 1, "mm_turns_total{outcome=ok} rose by one for the turn")
found["session"] = session
found["first"] = {"text": text, "usage": first.usage.model_dump()}

second = client.chat.completions.create(
    model=pair,
    messages=[{"role": "user", "content": "Now one line about the moon."}],
    max_tokens=32,
    extra_headers={"X-Session-Id": session},
    extra_body={"dream": QUICK},
)
check(second.model_extra.get("session_id") == session, "the continued reply names the same session")
u1, u2 = first.usage, second.usage
# The second prime holds the system line, the first exchange and the new message.
check(
    u2.prompt_tokens >= u1.prompt_tokens + u1.completion_tokens,
    f"the second prime ({u2.prompt_tokens} tokens) includes the first turn "
    f"({u1.prompt_tokens} + {u1.completion_tokens})",
)
# ... and the replica that primed the first turn reused its KV (OpenAI's
# prompt_tokens_details.cached_tokens): all of the first prime, which the second extends, or,
# when the chosen reply came from a retry of the same prompt, all of it but the last token.
cached = u2.prompt_tokens_details.cached_tokens if u2.prompt_tokens_details else 0
check(
    u1.prompt_tokens <= cached < u2.prompt_tokens,
    f"the second prime reused {cached} cached tokens; the first prime had {u1.prompt_tokens}, "
    f"the second {u2.prompt_tokens}",
)
found["second"] = {"text": second.choices[0].message.content, "usage": u2.model_dump()}

chunks, pieces, dream_events = 0, [], set()
stream = client.chat.completions.create(
    model=pair,
    messages=[{"role": "user", "content": "Describe a lighthouse."}],
    max_tokens=32,
    stream=True,
    stream_options={"include_usage": True},
    extra_body={"dream": QUICK},
)
usage = None
for chunk in stream:
    chunks += 1
    extra = chunk.model_extra or {}
    if "x_dream" in extra and "type" in extra["x_dream"]:
        dream_events.add(extra["x_dream"]["type"])
    if chunk.usage:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
streamed = "".join(pieces)
check(len(pieces) >= 2 and streamed.strip(), f"several non-empty content chunks, got {pieces}")
check({"latent_step", "critique"} <= dream_events, f"x_dream carries the dream: {dream_events}")
check(usage is not None and usage.completion_tokens > 0, "a usage chunk when asked for")
found["streamed"] = {"text": streamed, "chunks": chunks, "events": sorted(dream_events)}

for name, call, want in [
    (
        "an empty message",
        lambda: client.chat.completions.create(model=pair, messages=[{"role": "user", "content": "  "}]),
        openai.BadRequestError,
    ),
    (
        "an unknown session",
        lambda: client.chat.completions.create(
            model=pair,
            messages=[{"role": "user", "content": "hello"}],
            extra_body={"session_id": "no-such-session"},
        ),
        openai.NotFoundError,
    ),
    (
        "an unknown model",
        lambda: client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hello"}]),
        openai.NotFoundError,
    ),
]:
    try:
        call()
        check(False, f"{name} is refused")
    except want as e:
        err = (e.body or {}) if isinstance(e.body, dict) else {}
        # The client unwraps {"error": {...}} into e.body.
        check(isinstance(err.get("message"), str) and err.get("type"), f"{name}: OpenAI-shaped error {e.body}")
        found.setdefault("errors", []).append({"status": e.status_code, "message": err["message"]})

print(json.dumps(found))
