#!/usr/bin/env python3
"""HF transformers on a GPU, the reference for `muse bench --shape/--weights --device cuda:0`.

Builds a Qwen2 model of a named shape with random weights (torch.manual_seed), bf16, on cuda:0,
then measures eager greedy decode at batch 1 (generate() and a plain cached loop), a
Soft-Thinking latent loop (top-k concept mix fed back as inputs_embeds) and batch-B decode.
With --save-dir the weights are saved (safetensors + config.json) for our binary to load
(`muse bench --weights DIR`), and with --reference the prompt, the logits after it and 32
greedy tokens are written for `muse bench --reference` to compare against.

No internet is needed: nothing is downloaded.
"""
import argparse
import json
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

SHAPES = {
    # hidden, layers, heads, kv_heads, intermediate, vocab, tied
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 8960, 151936, True),
    "qwen2.5-7b": (3584, 28, 28, 4, 18944, 152064, False),
}


def build(shape, seed):
    h, l, nh, kv, ff, v, tied = SHAPES[shape]
    cfg = Qwen2Config(
        hidden_size=h, num_hidden_layers=l, num_attention_heads=nh, num_key_value_heads=kv,
        intermediate_size=ff, vocab_size=v, tie_word_embeddings=tied,
        max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


def prompt_ids(vocab, n=32):
    # The same prompt `muse bench --shape` uses without a reference.
    return [(i * 7919 + 13) % vocab for i in range(n)]


def sync_time(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


@torch.no_grad()
def greedy_loop(model, ids, steps):
    out = model(input_ids=ids, use_cache=True)
    past, nxt, toks = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), []
    for _ in range(steps):
        toks.append(nxt[0, 0].item())
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return toks


@torch.no_grad()
def soft_loop(model, ids, steps, k=50, temperature=0.8):
    emb = model.get_input_embeddings().weight
    out = model(input_ids=ids, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1].float()
    for _ in range(steps):
        p = torch.softmax(logits / temperature, -1)
        top, idx = p.topk(k, -1)
        top = top / top.sum(-1, keepdim=True)
        e = (top.unsqueeze(-1) * emb[idx].float()).sum(1, keepdim=True).to(emb.dtype)
        out = model(inputs_embeds=e, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1].float()
    return logits


def best_of(repeats, fn):
    return min(sync_time(fn)[0] for _ in range(repeats))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--save-dir", help="save the weights here (safetensors + config.json)")
    ap.add_argument("--reference", help="write prompt, logits and greedy tokens here (JSON)")
    a = ap.parse_args()

    model = build(a.shape, a.seed)
    vocab = model.config.vocab_size
    ids = torch.tensor([prompt_ids(vocab)], device="cuda")
    report = {"shape": a.shape, "seed": a.seed, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0)}
    import transformers
    report["transformers"] = transformers.__version__

    greedy_loop(model, ids, 4)  # warm-up
    t = best_of(a.repeats, lambda: model.generate(
        ids, max_new_tokens=a.steps, min_new_tokens=a.steps, do_sample=False,
        pad_token_id=0))
    report["hf_eager_generate_tokens_per_s"] = a.steps / t
    t = best_of(a.repeats, lambda: greedy_loop(model, ids, a.steps))
    report["hf_eager_loop_tokens_per_s"] = a.steps / t
    t = best_of(a.repeats, lambda: soft_loop(model, ids, a.steps))
    report["hf_eager_soft_thinking_steps_per_s"] = a.steps / t
    batch = ids.repeat(a.batch, 1)
    t = best_of(a.repeats, lambda: model.generate(
        batch, max_new_tokens=a.steps, min_new_tokens=a.steps, do_sample=False,
        pad_token_id=0))
    report["hf_eager_batch_generate_aggregate_tokens_per_s"] = a.batch * a.steps / t
    report["batch"] = a.batch

    if a.reference:
        def last_and_greedy():
            with torch.no_grad():
                last = model(input_ids=ids).logits[0, -1].float()
            return last, greedy_loop(model, ids, 32)
        last, greedy = last_and_greedy()
        # transformers against itself: the same weights with eager attention instead of SDPA.
        # The differences here are the bf16 noise floor our own comparison is judged by.
        self_check = {}
        try:
            model.set_attn_implementation("eager")
            last_e, greedy_e = last_and_greedy()
            same = next((i for i, (x, y) in enumerate(zip(greedy, greedy_e)) if x != y), 32)
            self_check = {"eager_vs_sdpa_max_abs_logit_diff": (last - last_e).abs().max().item(),
                          "eager_vs_sdpa_greedy_identical_prefix": same}
        except Exception as e:  # older transformers: no set_attn_implementation
            self_check = {"error": str(e)}
        with open(a.reference, "w") as f:
            json.dump({"prompt": prompt_ids(vocab), "last_logits": last.cpu().tolist(),
                       "greedy": greedy, "timings": report, "self_check": self_check}, f)
    if a.save_dir:
        model.save_pretrained(a.save_dir, safe_serialization=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
