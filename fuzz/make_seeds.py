#!/usr/bin/env python3
"""Writes the fuzz seeds under fuzz/corpus/<target>/seed-*: a tiny but complete llama GGUF
(two-layer-free: one block, 8 wide, a 12-token llama tokenizer and a chat template), a few
well-formed request messages, and short random inputs for the structured targets. Standard
library only; run once, commit the output. Inputs that crashed a harness are committed beside
the seeds under other names (crash-*), so tests/corpus.rs replays both."""

import os
import random
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- GGUF v3 -------------------------------------------------------------------------------
U32, I32, F32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9


def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def value(kind, v):
    if kind == U32:
        return struct.pack("<I", v)
    if kind == I32:
        return struct.pack("<i", v)
    if kind == F32:
        return struct.pack("<f", v)
    if kind == BOOL:
        return struct.pack("<?", v)
    if kind == STRING:
        return gstr(v)
    raise ValueError(kind)


def kv(key, kind, v):
    out = gstr(key) + struct.pack("<I", kind)
    if kind == ARRAY:
        inner, items = v
        out += struct.pack("<IQ", inner, len(items))
        out += b"".join(value(inner, x) for x in items)
    else:
        out += value(kind, v)
    return out


def tiny_llama():
    hidden, heads, kv_heads, ffn = 8, 2, 1, 16
    head = hidden // heads
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "H", "i", "t", "h", "e", "r", "\u2581t", "er"]
    vocab = len(tokens)
    meta = [
        kv("general.architecture", STRING, "llama"),
        kv("llama.embedding_length", U32, hidden),
        kv("llama.block_count", U32, 1),
        kv("llama.feed_forward_length", U32, ffn),
        kv("llama.attention.head_count", U32, heads),
        kv("llama.attention.head_count_kv", U32, kv_heads),
        kv("llama.context_length", U32, 64),
        kv("llama.rope.dimension_count", U32, head),
        kv("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        kv("llama.rope.freq_base", F32, 10000.0),
        kv("tokenizer.ggml.model", STRING, "llama"),
        kv("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
        kv("tokenizer.ggml.scores", ARRAY, (F32, [0.0] * 3 + [-float(i) for i in range(vocab - 3)])),
        kv("tokenizer.ggml.token_type", ARRAY, (I32, [2, 3, 3] + [1] * (vocab - 3))),
        kv("tokenizer.ggml.bos_token_id", U32, 1),
        kv("tokenizer.ggml.eos_token_id", U32, 2),
        kv("tokenizer.ggml.unknown_token_id", U32, 0),
        kv("tokenizer.chat_template", STRING,
           "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
           "{% if add_generation_prompt %}<s>assistant: {% endif %}"),
    ]
    # (name, [rows, cols]) as the runtime sees them; GGUF stores the dimensions reversed.
    tensors = [("token_embd.weight", [vocab, hidden]), ("output_norm.weight", [hidden]),
               ("blk.0.attn_norm.weight", [hidden]), ("blk.0.ffn_norm.weight", [hidden]),
               ("blk.0.attn_q.weight", [heads * head, hidden]),
               ("blk.0.attn_k.weight", [kv_heads * head, hidden]),
               ("blk.0.attn_v.weight", [kv_heads * head, hidden]),
               ("blk.0.attn_output.weight", [hidden, heads * head]),
               ("blk.0.ffn_gate.weight", [ffn, hidden]), ("blk.0.ffn_up.weight", [ffn, hidden]),
               ("blk.0.ffn_down.weight", [hidden, ffn])]
    rng = random.Random(7)
    infos, data = b"", b""
    for name, dims in tensors:
        n = 1
        for d in dims:
            n *= d
        infos += gstr(name) + struct.pack("<I", len(dims))
        infos += b"".join(struct.pack("<Q", d) for d in reversed(dims))
        infos += struct.pack("<IQ", 0, len(data))  # type 0 = F32, offset in the data section
        norm = name.endswith("norm.weight")
        data += b"".join(struct.pack("<f", 1.0 if norm else rng.gauss(0, 0.3)) for _ in range(n))
        data += b"\0" * (-len(data) % 32)
    head_bytes = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta)) + b"".join(meta) + infos
    head_bytes += b"\0" * (-len(head_bytes) % 32)
    return head_bytes + data


# ---- protobuf ------------------------------------------------------------------------------
def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, wire, payload):
    key = varint(num << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    if wire == 2:
        return key + varint(len(payload)) + payload
    if wire == 5:
        return key + struct.pack("<f", payload)
    raise ValueError(wire)


def main():
    put("gguf", "seed-tiny-llama", tiny_llama())
    # Muse ClientCommand (selector 0): a chat prime, a burst, a commit.
    chat = field(1, 2, field(1, 2, field(1, 2, b"user") + field(2, 2, b"Hello there")))
    put("requests", "seed-prime", b"\0" + field(1, 0, 1) + field(10, 2, field(1, 2, chat)))
    burst = field(1, 0, 1) + field(3, 5, 0.8) + field(4, 0, 50) + field(5, 5, 0.9)
    put("requests", "seed-burst", b"\0" + field(1, 0, 2) + field(11, 2, burst))
    put("requests", "seed-commit", b"\0" + field(1, 0, 3) + field(12, 2, field(2, 0, 16)))
    # Orchestrator TurnRequest (1) and CreateSessionRequest (2) with a policy.
    policy = field(1, 0, 2) + field(2, 0, 4) + field(3, 0, 16) + field(4, 5, 0.1)
    put("requests", "seed-turn",
        b"\1" + field(1, 2, b"s" * 32) + field(2, 2, b"Hi") + field(4, 2, policy))
    put("requests", "seed-create", b"\2" + field(2, 2, policy))
    rng = random.Random(11)
    for target in ("tokenizer", "chat_template"):
        for i, n in enumerate((16, 64, 256)):
            put(target, f"seed-random-{i}", bytes(rng.randrange(256) for _ in range(n)))


if __name__ == "__main__":
    main()
