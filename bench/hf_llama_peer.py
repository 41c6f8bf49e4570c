"""Peer for the llama benchmark shape: Hugging Face LlamaForCausalLM (PyTorch, CPU), trained as t5lite is.

    ~/peer-venv/bin/python bench/hf_llama_peer.py [batch length steps warmup]

The shape of t5lite's gin/models/llama_small.gin with Llama's 32000 ids: d_model 512, d_ff 1408,
8 layers, 8 heads x 64 sharing 2 key/value heads, RoPE, SwiGLU, RMSNorm eps 1e-5, untied LM head;
AdamW(1e-3), float32, random token ids, transformers' default attention (SDPA). Prints one JSON
line like ../shared/bench/peers/hf_t5_train.py.
"""
import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main(batch=8, length=512, steps=6, warmup=2):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, use_cache=False, attention_dropout=0.0)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(2, 32000, (batch, length))
    model.train()
    times = []
    for _ in range(warmup + steps):
        t = time.perf_counter()
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    timed = sorted(times[warmup:])
    median = timed[len(timed) // 2]
    print(json.dumps({"peer": "hf_llama_torch", "torch": torch.__version__,
                      "attention": model.config._attn_implementation, "params": n_params, "batch": batch,
                      "length": length, "median_step_s": median, "best_step_s": timed[0],
                      "train_tokens_per_s": batch * length / median}))


if __name__ == "__main__":
    main(*[int(a) for a in sys.argv[1:]])
