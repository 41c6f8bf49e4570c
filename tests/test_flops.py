"""The analytic FLOPs count against XLA's own count of the compiled forward pass."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from t5lite.model import flops
from t5lite.model.config import TransformerConfig
from t5lite.model.models import Model

# Unrolled: XLA's cost analysis counts a scanned loop body once, not once per layer.
BASE = TransformerConfig(vocab_size=512, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=160,
                         num_encoder_layers=3, num_decoder_layers=2, scan_layers=False)


def _xla_forward_flops(config, batch, inputs_length, targets_length):
    model = Model(config)
    shapes = model.input_shapes(batch, {"inputs": inputs_length, "targets": targets_length} if inputs_length
                                else {"targets": targets_length})
    params = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), shapes))["params"])
    batch_arrays = {k: jax.ShapeDtypeStruct(s, np.int32) for k, s in shapes.items()}
    batch_arrays["decoder_target_tokens"] = batch_arrays["decoder_input_tokens"]
    compiled = jax.jit(lambda p, b: model.logits(p, b)).lower(params, batch_arrays).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize("architecture, inputs_length, targets_length", [
    ("encoder_decoder", 48, 16), ("encoder_decoder", 16, 40), ("decoder_only", 0, 64)])
def test_forward_flops_match_xla_cost_analysis(architecture, inputs_length, targets_length):
    config = dataclasses.replace(BASE, architecture=architecture)
    analytic = flops.forward_flops(config, 2, inputs_length, targets_length).forward
    xla = _xla_forward_flops(config, 2, inputs_length, targets_length)
    # XLA also counts elementwise work (norms, softmax, GELU, masks), a few percent here.
    assert analytic <= xla and xla / analytic < 1.10, (analytic, xla)


def test_breakdown_parts_and_training_multiple():
    b = flops.forward_flops(BASE, 2, 48, 16)
    hd = 64
    assert b.logits == 2 * 32 * 64 * 512
    assert b.cross_attention == 2 * (2 * 64 * hd * (2 * 32 + 2 * 96) + 2 * 2 * 2 * 16 * 48 * hd)
    assert flops.train_step_flops(BASE, 2, 48, 16) == 3 * b.forward
    assert flops.mfu(BASE, 2, 48, 16, step_seconds=1.0, peak_flops_per_second=3 * b.forward) == pytest.approx(1.0)
