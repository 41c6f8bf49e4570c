"""What the Hugging Face converters (t5lite.hf_t5, t5lite.hf_llama) share: reading and writing a
Hugging Face model directory, reading a training checkpoint to export, writing an imported model as a
t5lite MODEL_DIR, and their command line.

A Hugging Face directory holds config.json and the weights: model.safetensors or pytorch_model.bin,
or their shards with the index transformers writes for large models. Weights are read as numpy
(safetensors without PyTorch) and written as float32 safetensors. Torch Linear weights are
[out, in], t5lite kernels [in, ...out]: each converter transposes its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import gin
import numpy as np
import seqio

from t5lite import checkpoints, fileio, gin_cli, run_dir
from t5lite.data import vocab_record
from t5lite.data.vocab import get_default_vocabulary
from t5lite.errors import UserError
from t5lite.model.config import TransformerConfig

Params = dict[str, Any]


# --- Hugging Face directories ----------------------------------------------------------------------------

def read_json(path: str) -> dict[str, Any]:
    """A JSON object from a HF model directory; a file that is not one is a UserError naming it."""
    try:
        with open(path) as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not an object.")
    return value


def read_hf_config(directory: str, family: str) -> dict[str, Any]:
    """config.json of a HF model directory (`family`, e.g. "T5", names the model in the error)."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise UserError(f"{directory} has no config.json: is it a Hugging Face {family} model directory?")
    return read_json(config_path)


def read_state_dict(directory: str) -> dict[str, np.ndarray]:
    """Every tensor of a HF model directory, by name (numpy, in the stored dtype)."""
    state = {}
    for path in weight_files(directory):
        state.update(_read_weights(path))
    return state


def weight_files(directory: str) -> list[str]:
    """The weight files of a HF model directory: one file, or the shards its index names."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(directory, name)):
            return [os.path.join(directory, name)]
        index = os.path.join(directory, f"{name}.index.json")
        if os.path.exists(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index} has no \"weight_map\" of tensor names to shard files.")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not os.path.exists(os.path.join(directory, s))]
            if missing:
                raise UserError(f"{index} names shards that {directory} lacks: {missing[:3]}.")
            return [os.path.join(directory, s) for s in shards]
    raise UserError(f"{directory} has neither model.safetensors nor pytorch_model.bin (nor an index of their shards).")


def _read_weights(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file  # noqa: PLC0415

        return load_file(path)  # bfloat16 tensors come as ml_dtypes.bfloat16; the converters cast to float32
    try:
        import torch  # noqa: PLC0415
    except ImportError as e:
        raise UserError(f"{path} needs PyTorch to read; install torch or convert it to safetensors.") from e
    return {k: v.float().numpy() for k, v in torch.load(path, map_location="cpu").items()}


def write_hf_model(directory: str, hf_config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Writes config.json and model.safetensors (float32) that transformers' from_pretrained reads."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
              os.path.join(directory, "model.safetensors"))


# --- Layer stacks ----------------------------------------------------------------------------------------

def stack_layers(layers: list[Params], scan: bool) -> Params:
    """Per-layer params -> a stack's {"layers": [layers, ...] leaves} (scan) or {"layers_i": ...}."""
    if scan:
        import jax  # noqa: PLC0415

        return {"layers": jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers)}
    return {f"layers_{i}": layer for i, layer in enumerate(layers)}


def unstack_layers(stack: Params, num_layers: int, scan: bool) -> list[Params]:
    """The inverse of stack_layers: a stack's params -> one params tree per layer."""
    if scan:
        import jax  # noqa: PLC0415

        return [jax.tree_util.tree_map(lambda x, i=i: np.asarray(x)[i], stack["layers"]) for i in range(num_layers)]
    return [stack[f"layers_{i}"] for i in range(num_layers)]


# --- t5lite runs -----------------------------------------------------------------------------------------

def read_checkpoint_to_export(checkpoint: str, output: str) -> tuple[TransformerConfig, Params, seqio.Vocabulary]:
    """(config, params, vocabulary) of a training checkpoint (MODEL_DIR/checkpoints/<step>) to export to the
    new directory `output`: the model from MODEL_DIR/config.gin (clears and re-parses gin), the vocabulary
    the run was trained with (vocabulary.json; t5lite's default without one)."""
    if os.path.exists(output):
        raise UserError(f"{output} already exists; choose a new --output directory.")
    model_dir = run_dir.model_dir_of(fileio.absolute(checkpoint))
    config_path = run_dir.path(model_dir, run_dir.CONFIG)
    if not fileio.exists(config_path):
        raise UserError(f"{config_path} does not exist: pass MODEL_DIR/checkpoints/<step> of a t5lite run (or of "
                        "an export by t5lite.finetune, which copies the run's config.gin).")
    gin_cli.parse_run_config(config_path)
    config = TransformerConfig()
    gin.clear_config()
    params = checkpoints.read_params(checkpoint)
    if "lora" in params:
        raise UserError(f"{checkpoint} is a LoRA fine-tuning checkpoint: merge its adapters first "
                        "(python -m t5lite.finetune --model_dir=... --output=...) and export the merged checkpoint.")
    embedding = params.get("token_embedder", {}).get("embedding")
    if np.shape(embedding) != (config.vocab_size, config.emb_dim):
        raise UserError(f"{checkpoint}'s token embedding is {np.shape(embedding)}, but {config_path} describes a "
                        f"model of ({config.vocab_size}, {config.emb_dim}).")
    vocabulary = vocab_record.trained_vocabulary(model_dir)
    if vocabulary is None:
        if vocab_record.read(model_dir) is not None:
            raise UserError(f"{model_dir}/{vocab_record.RECORD} names a vocabulary t5lite cannot rebuild; only "
                            "SentencePiece and byte vocabularies export.")
        print(f"{model_dir} has no {vocab_record.RECORD}: exporting t5lite's default vocabulary as the tokenizer.",
              file=sys.stderr)
        vocabulary = get_default_vocabulary()
    return config, params, vocabulary


def write_model_dir(output: str, params: Params, config: TransformerConfig, fields: Sequence[str], origin: str,
                    vocabulary: seqio.SentencePieceVocabulary | None) -> str:
    """Writes an imported model as the new t5lite MODEL_DIR `output`: checkpoints/0 (params, step 0),
    config.gin (the TransformerConfig `fields`, under the comment `origin`) and, with a `vocabulary`, a
    copy of its SentencePiece model (spiece.model) and vocabulary.json naming it, so fine-tuning and
    evaluation check their data's vocabulary against it."""
    output = fileio.absolute(output)  # a MODEL_DIR: a local directory or a bucket, written through fileio
    fileio.makedirs(output)
    ckpt = checkpoints.Checkpointer(run_dir.checkpoints_dir(output), save_every=1, keep=None, async_save=False)
    ckpt.save(0, {"step": np.int32(0), "params": params}, force=True)
    ckpt.wait()
    ckpt.close()
    with fileio.open_file(run_dir.path(output, run_dir.CONFIG), "w") as f:
        f.write(f"# {origin}\nimport t5lite.model.config\n\n")
        f.writelines(f"TransformerConfig.{name} = {getattr(config, name)!r}\n" for name in fields)
    if vocabulary is not None:
        model_file = fileio.join(output, "spiece.model")
        fileio.copy(vocabulary.sentencepiece_model_file, model_file)
        vocabulary = seqio.SentencePieceVocabulary(model_file, extra_ids=vocabulary.extra_ids)
        vocab_record.write(output, {name: seqio.Feature(vocabulary) for name in ("inputs", "targets")})
    return output


def fits_embedding(vocabulary: seqio.Vocabulary, path: str, config: TransformerConfig) -> None:
    """Refuses a tokenizer with more ids than the model has embedding rows."""
    if vocabulary.vocab_size > config.vocab_size:
        raise UserError(f"{path} with {vocabulary.extra_ids} sentinels has {vocabulary.vocab_size} ids, more than "
                        f"the model's {config.vocab_size} embedding rows.")


# --- The command line ------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None, description: str, family: str) -> argparse.Namespace:
    """--checkpoint=... --output=... (export) or --from_hf=... --output=... (import)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="export MODEL_DIR/checkpoints/<step> to a Hugging Face directory")
    source.add_argument("--from_hf", help=f"import this Hugging Face {family} directory as a t5lite MODEL_DIR")
    parser.add_argument("--output", required=True, help="a new directory")
    return parser.parse_args(argv)


def report(args: argparse.Namespace, path: str, family: str) -> None:
    """What main() prints after an export or import."""
    if args.checkpoint:
        print(f"Wrote {args.checkpoint} as a Hugging Face {family} model and tokenizer to {path}")
    else:
        print(f"Wrote {args.from_hf} as the t5lite MODEL_DIR {path}: fine-tune with --gin_file={path}/config.gin "
              f"--gin.INITIAL_CHECKPOINT=\\\"{path}/checkpoints/0\\\"")
