"""Peer for the decoder-only benchmark shape: Hugging Face T5 decoder stack as a causal LM (PyTorch, CPU).

    ~/peer-venv/bin/python bench/hf_t5_decoder_only_peer.py [batch length steps warmup]

The architecture of t5lite's decoder-only model: T5 v1.1 decoder blocks (relative-position bias,
RMSNorm, gated GELU) without cross-attention (HF skips it when no encoder states are given),
then an untied LM head. d_model 512, d_ff 1024, 8 layers, 6 heads x 64, vocab 32128, AdamW,
float32, random token ids. Prints one JSON line like ../shared/bench/peers/hf_t5_train.py.
"""
import json
import sys
import time

import torch
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Stack


class T5DecoderLM(torch.nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.decoder = T5Stack(cfg)  # owns the token embedding
        self.lm_head = torch.nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.decoder(input_ids=tokens, use_cache=False).last_hidden_state
        logits = self.lm_head(hidden)
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1))


def main(batch=8, length=512, steps=6, warmup=2):
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0, is_decoder=True, is_encoder_decoder=False,
                   use_cache=False)
    model = T5DecoderLM(cfg)
    # Cross-attention weights exist in HF's decoder blocks but are never used without encoder states.
    n_params = sum(p.numel() for n, p in model.named_parameters() if "EncDecAttention" not in n)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(2, 32000, (batch, length))
    model.train()
    times = []
    for _ in range(warmup + steps):
        t = time.perf_counter()
        loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    timed = sorted(times[warmup:])
    print(json.dumps({"peer": "hf_t5_decoder_stack_torch", "torch": torch.__version__, "params": n_params,
                      "batch": batch, "length": length, "median_step_s": timed[len(timed) // 2],
                      "best_step_s": timed[0], "train_tokens_per_s": batch * length / timed[len(timed) // 2]}))


if __name__ == "__main__":
    main(*[int(a) for a in sys.argv[1:]])
