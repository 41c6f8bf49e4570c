"""Trains the tiny model with each partitioning preset on 8 simulated CPU devices (used by
tests/test_partitioning.py, which runs it in a subprocess: the device count is fixed when jax starts).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/presets_on_8_devices.py OUT_DIR ARGS...

ARGS are t5lite.train flags shared by every run. Prints one JSON line per preset:
{"preset", "mesh", "trained_mesh" (model-info.txt's line), "losses" (per logged step), "param_specs"
and "state_specs" (name -> mesh axes of the arrays the sharded init places, for a few parameters
and their Adafactor statistics), "inference" (greedy decoding and target scoring with those
sharded params and the batch split over the mesh, against the same params on one device: tokens
equal, largest score differences), "quantized_base" (fsdp+tp only: a LoRA state on an int8
base, its codes sharded like their kernels)}.
"""

import json
import os
import sys

import gin
import jax
import numpy as np

from t5lite import adaptation as adaptation_lib
from t5lite import inference, partitioning, peft, trainer
from t5lite import train as train_lib
from t5lite.model.config import TransformerConfig
from t5lite.model.decoding import DecodeConfig
from t5lite.model.models import Model
from t5lite.optim import make_optimizer

# preset -> make_mesh sizes (data, fsdp, tensor); the tiny model has 2 heads, so tensor <= 2.
MESHES = {"dp": (8, 1, 1), "fsdp": (1, 8, 1), "tp": (4, 1, 2), "fsdp+tp": (1, 4, 2)}
CHECKED_PARAMS = ("token_embedder/embedding", "encoder/layers/mlp/wi_0", "encoder/layers/attention/query",
                  "decoder/logits_dense")


def _specs(tree, names) -> dict[str, list]:
    flat = {partitioning._path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return {n: [a if a is None or isinstance(a, str) else list(a) for a in flat[n].sharding.spec]
            for n in names if n in flat}


def _sharded_against_one_device_inference(model: Model, params, mesh, rules) -> dict:
    """Greedy decoding and scoring with `params` as sharded on `mesh`, the batch split over its data
    axes (t5lite.inference, as eval, infer and training's inference evaluation run them), against
    a one-device copy of the params."""
    rng = np.random.default_rng(0)
    batch = {"encoder_input_tokens": rng.integers(2, 100, (8, 64)).astype(np.int32),
             "decoder_target_tokens": rng.integers(2, 100, (8, 16)).astype(np.int32)}
    batch["decoder_input_tokens"] = np.pad(batch["decoder_target_tokens"][:, :-1], [(0, 0), (1, 0)])
    config = DecodeConfig(max_decode_length=8, eos_id=-1)
    sharded = inference.BatchInference(model, mesh, rules, batch_size=8, decode_config=config,
                                       bidirectional_prompt=True)
    key = jax.random.PRNGKey(0)
    tokens, scores = sharded.predict(sharded.decode_params(params), batch, key)
    target_scores = sharded.score(params, batch)
    one_device = jax.device_put(jax.device_get(params), jax.devices()[0])
    ref_tokens, ref_scores = jax.jit(lambda p, b, r: model.predict_batch(p, b, config, r))(
        jax.jit(model.decode_params)(one_device), batch, key)
    ref_target_scores = jax.jit(model.score_batch)(one_device, batch)
    return {"tokens_equal": bool(np.array_equal(tokens, ref_tokens)),
            "score_diff": float(np.max(np.abs(scores - np.asarray(ref_scores)))),
            "score_scale": float(np.max(np.abs(ref_scores))),
            "target_score_diff": float(np.max(np.abs(target_scores - np.asarray(ref_target_scores)))),
            "target_score_scale": float(np.max(np.abs(ref_target_scores)))}


def _quantized_base(model: Model, optimizer, mesh, rules) -> dict:
    """A LoRA state on an int8 base initialised on `mesh`: where the codes of a few kernels live,
    the fraction of each such kernel's codes one device holds, and whether the model params
    (dequantized, adapters merged) on the mesh equal those computed on one device."""
    adaptation = adaptation_lib.LoraAdaptation(patterns=(r"(query|wi_0)$",), rank=4, base_bits=8, block_size=16,
                                         min_quantized_size=256)
    init = trainer.make_sharded_init(model, optimizer.tx, model.input_shapes(8, {"inputs": 64, "targets": 16}),
                                     mesh, rules, adaptation)
    state = init.init_fn(jax.random.PRNGKey(0))
    is_q = lambda x: isinstance(x, peft.QuantizedTensor)  # noqa: E731
    flat = {partitioning._path_name(path): q for path, q in jax.tree_util.tree_flatten_with_path(
        state.params["base"], is_leaf=is_q)[0] if is_q(q)}
    merged = jax.jit(adaptation.model_params)(state.params)
    one_device = jax.jit(adaptation.model_params)(jax.device_put(jax.device_get(state.params), jax.devices()[0]))
    return {
        "codes_specs": _specs({n: q.codes for n, q in flat.items()}, CHECKED_PARAMS),
        "codes_fraction_per_device": {n: flat[n].codes.addressable_shards[0].data.size / flat[n].codes.size
                                      for n in CHECKED_PARAMS if n in flat},
        "merged_equal": all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
            lambda a, b: bool(np.array_equal(a, b)), merged, one_device))),
    }


def main(out_dir: str, args: list[str]) -> None:
    assert jax.device_count() == 8, jax.devices()
    for preset, (data, fsdp, tensor) in MESHES.items():
        gin.clear_config()
        model_dir = os.path.join(out_dir, preset.replace("+", "_"))
        code = train_lib.main([*args, f"--gin.MODEL_DIR='{model_dir}'",
                               f"--gin.TrainConfig.partitioning_preset='{preset}'",
                               f"--gin.make_mesh.data={data}", f"--gin.make_mesh.fsdp={fsdp}",
                               f"--gin.make_mesh.tensor={tensor}"])
        assert code == 0, preset
        with open(os.path.join(model_dir, "metrics.jsonl")) as f:
            losses = [r["loss"] for r in map(json.loads, f) if r["group"] == "train"]
        with open(os.path.join(model_dir, "model-info.txt")) as f:
            trained_mesh = next(line.strip() for line in f if line.startswith("mesh: "))  # the mesh train() built

        # The arrays the sharded init places, under the same gin config the run used.
        model, optimizer = Model(TransformerConfig()), make_optimizer()
        mesh = partitioning.make_mesh()
        rules = partitioning.axis_rules(preset)
        init = trainer.make_sharded_init(model, optimizer.tx, model.input_shapes(8, {"inputs": 64, "targets": 16}),
                                         mesh, rules)
        state = init.init_fn(jax.random.PRNGKey(0))
        factored = state.opt_state[0]  # optax.adafactor: FactoredState first
        print(json.dumps({
            "preset": preset, "mesh": dict(mesh.shape), "trained_mesh": trained_mesh, "losses": losses,
            "param_specs": _specs(state.params, CHECKED_PARAMS),
            "state_specs": {"v_row": _specs(factored.v_row, CHECKED_PARAMS),
                            "v_col": _specs(factored.v_col, CHECKED_PARAMS)},
            "inference": _sharded_against_one_device_inference(model, state.params, mesh, rules),
            "quantized_base": _quantized_base(model, optimizer, mesh, rules) if preset == "fsdp+tp" else None,
        }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
