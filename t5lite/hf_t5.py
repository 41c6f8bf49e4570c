"""Hugging Face T5 interop: T5 v1.1 weights in a local directory <-> t5lite parameters.

    config, params = load_hf_t5("path/to/t5-v1_1-small")        # config.json + model.safetensors
    save_hf_t5(params, config, "path/to/export")                  # (or pytorch_model.bin on import)

A training checkpoint, as a directory transformers' from_pretrained reads (model and tokenizer):

    python -m t5lite.hf_t5 --checkpoint=runs/base/checkpoints/600 --output=hf/base

The model's shapes come from the run's MODEL_DIR/config.gin, its tokenizer from the vocabulary it
was trained with (MODEL_DIR/vocabulary.json; t5lite's default without one). And the other way, a
Hugging Face T5 v1.1 directory as a t5lite MODEL_DIR to fine-tune from (checkpoints/0, config.gin
with the model's TransformerConfig, and with a spiece.model its vocabulary.json):

    python -m t5lite.hf_t5 --from_hf=path/to/t5-v1_1-small --output=runs/t5_small

Only T5 v1.1-style models map onto t5lite: gated-GELU MLP, RMS layer norm, relative position
bias in the first layer of each stack. Parameters are float32 numpy arrays; torch Linear
weights are [out, in], t5lite kernels are [in, ...out], so every kernel is transposed.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import seqio

from t5lite import fileio, hf_conversion
from t5lite.errors import UserError, reports_user_errors
from t5lite.hf_conversion import stack_layers, unstack_layers
from t5lite.model.config import TransformerConfig

Params = dict[str, Any]


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig of a transformers T5Config dict (config.json)."""
    if hf.get("feed_forward_proj", "relu") != "gated-gelu":
        raise UserError(f"Only T5 v1.1 (feed_forward_proj='gated-gelu') maps onto t5lite; this config has "
                        f"{hf.get('feed_forward_proj', 'relu')!r}.")
    return TransformerConfig(
        architecture="encoder_decoder", vocab_size=hf["vocab_size"], emb_dim=hf["d_model"],
        num_heads=hf["num_heads"], head_dim=hf["d_kv"], mlp_dim=hf["d_ff"], num_encoder_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        relpos_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relpos_max_distance=hf.get("relative_attention_max_distance", 128),
        tie_embeddings=_scales_decoder_output(hf), dropout_rate=0.0, **overrides)


def _scales_decoder_output(hf: dict[str, Any]) -> bool:
    """Whether the model scales the decoder's output by d_model**-0.5 before the output layer, as T5
    1.0 does with its tied output layer (t5lite's tie_embeddings) and T5 v1.1 does not.

    Before transformers 5 config.json said so with tie_word_embeddings; transformers 5 writes
    tie_word_embeddings=true for every T5 and says it with scale_decoder_outputs."""
    if "scale_decoder_outputs" in hf:
        return bool(hf["scale_decoder_outputs"])
    return hf.get("tie_word_embeddings", True) is not False


def hf_config_from(config: TransformerConfig) -> dict[str, Any]:
    if not config.is_encoder_decoder:
        raise UserError("Only encoder-decoder t5lite models export to Hugging Face T5 (decoder-only Llama-style "
                        "models: python -m t5lite.hf_llama).")
    if config.mlp_activation != "gelu" or config.layer_norm_epsilon != 1e-6:
        raise UserError(f"Hugging Face T5 v1.1 has a gated-GELU MLP and layer norm epsilon 1e-6; this model has "
                        f"mlp_activation={config.mlp_activation!r}, layer_norm_epsilon={config.layer_norm_epsilon}.")
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True,
        "vocab_size": config.vocab_size, "d_model": config.emb_dim, "d_kv": config.head_dim,
        "d_ff": config.mlp_dim, "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers, "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relpos_num_buckets,
        "relative_attention_max_distance": config.relpos_max_distance, "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": config.tie_embeddings, "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6,
        "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
    }


# (t5lite sub-module, HF sub-module) of the attention blocks of a layer.
_ENCODER_ATTENTION = (("attention", "layer.0.SelfAttention"),)
_DECODER_ATTENTION = (("self_attention", "layer.0.SelfAttention"),
                      ("encoder_decoder_attention", "layer.1.EncDecAttention"))
_ENCODER_NORMS = (("pre_attention_layer_norm", "layer.0.layer_norm"), ("pre_mlp_layer_norm", "layer.1.layer_norm"))
_DECODER_NORMS = (("pre_self_attention_layer_norm", "layer.0.layer_norm"),
                  ("pre_cross_attention_layer_norm", "layer.1.layer_norm"),
                  ("pre_mlp_layer_norm", "layer.2.layer_norm"))


def _layer_from_hf(hf: dict[str, np.ndarray], prefix: str, attention, norms, mlp: str, c: TransformerConfig) -> Params:
    """One t5lite layer {module: {param: array}} from the HF tensors under `prefix`."""
    h, d, e = c.num_heads, c.head_dim, c.emb_dim
    layer: Params = {}
    for ours, theirs in attention:
        w = {n: hf[f"{prefix}.{theirs}.{n}.weight"] for n in "qkvo"}
        layer[ours] = {"query": w["q"].T.reshape(e, h, d), "key": w["k"].T.reshape(e, h, d),
                       "value": w["v"].T.reshape(e, h, d), "out": w["o"].T.reshape(h, d, e)}
    for ours, theirs in norms:
        layer[ours] = {"scale": hf[f"{prefix}.{theirs}.weight"]}
    layer["mlp"] = {n: hf[f"{prefix}.{mlp}.DenseReluDense.{n}.weight"].T for n in ("wi_0", "wi_1", "wo")}
    return layer


def _layer_to_hf(layer: Params, prefix: str, attention, norms, mlp: str, c: TransformerConfig) -> dict[str, np.ndarray]:
    h, d, e = c.num_heads, c.head_dim, c.emb_dim
    out = {}
    for ours, theirs in attention:
        a = layer[ours]
        for name, key in (("q", "query"), ("k", "key"), ("v", "value")):
            out[f"{prefix}.{theirs}.{name}.weight"] = np.asarray(a[key]).reshape(e, h * d).T
        out[f"{prefix}.{theirs}.o.weight"] = np.asarray(a["out"]).reshape(h * d, e).T
    for ours, theirs in norms:
        out[f"{prefix}.{theirs}.weight"] = np.asarray(layer[ours]["scale"])
    for n in ("wi_0", "wi_1", "wo"):
        out[f"{prefix}.{mlp}.DenseReluDense.{n}.weight"] = np.asarray(layer["mlp"][n]).T
    return out


def params_from_hf(hf: dict[str, np.ndarray], config: TransformerConfig) -> Params:
    """t5lite params (nested dicts of float32 numpy) from a HF T5 state dict of numpy arrays."""
    hf = {k: np.asarray(v, np.float32) for k, v in hf.items()}
    enc = [_layer_from_hf(hf, f"encoder.block.{i}", _ENCODER_ATTENTION, _ENCODER_NORMS, "layer.1", config)
           for i in range(config.num_encoder_layers)]
    dec = [_layer_from_hf(hf, f"decoder.block.{i}", _DECODER_ATTENTION, _DECODER_NORMS, "layer.2", config)
           for i in range(config.num_decoder_layers)]
    bias = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    params = {
        "token_embedder": {"embedding": hf["shared.weight"]},
        "encoder": {**stack_layers(enc, config.scan_layers),
                    "encoder_norm": {"scale": hf["encoder.final_layer_norm.weight"]},
                    "relpos_bias": {"rel_embedding": hf[f"encoder.{bias}"].T}},
        "decoder": {**stack_layers(dec, config.scan_layers),
                    "decoder_norm": {"scale": hf["decoder.final_layer_norm.weight"]},
                    "relpos_bias": {"rel_embedding": hf[f"decoder.{bias}"].T}},
    }
    if not config.tie_embeddings:
        # transformers 5 may store a v1.1 output layer that equals shared.weight only once.
        params["decoder"]["logits_dense"] = hf.get("lm_head.weight", hf["shared.weight"]).T
    return params


def params_to_hf(params: Params, config: TransformerConfig) -> dict[str, np.ndarray]:
    """A HF T5 state dict (numpy float32, contiguous) from t5lite params."""
    out = {"shared.weight": np.asarray(params["token_embedder"]["embedding"])}
    for stack, n, attention, norms, mlp in (
        ("encoder", config.num_encoder_layers, _ENCODER_ATTENTION, _ENCODER_NORMS, "layer.1"),
        ("decoder", config.num_decoder_layers, _DECODER_ATTENTION, _DECODER_NORMS, "layer.2"),
    ):
        for i, layer in enumerate(unstack_layers(params[stack], n, config.scan_layers)):
            out.update(_layer_to_hf(layer, f"{stack}.block.{i}", attention, norms, mlp, config))
        out[f"{stack}.final_layer_norm.weight"] = np.asarray(params[stack][f"{stack}_norm"]["scale"])
        out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = np.asarray(
            params[stack]["relpos_bias"]["rel_embedding"]).T
    out["lm_head.weight"] = (out["shared.weight"] if config.tie_embeddings
                             else np.asarray(params["decoder"]["logits_dense"]).T)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def load_hf_t5(directory: str, **config_overrides: Any) -> tuple[TransformerConfig, Params]:
    """(config, params) from a local HF T5 directory: config.json + model.safetensors or
    pytorch_model.bin, or their shards (model-00001-of-00004.safetensors ... with
    model.safetensors.index.json, as transformers saves large models)."""
    config = config_from_hf(hf_conversion.read_hf_config(directory, "T5"), **config_overrides)
    state = hf_conversion.read_state_dict(directory)
    try:
        return config, params_from_hf(state, config)
    except KeyError as e:
        raise UserError(f"{directory} lacks the tensor {e} that a T5 v1.1 model with this config has.") from e


def save_hf_t5(params: Params, config: TransformerConfig, directory: str) -> None:
    """Writes config.json and model.safetensors that transformers' from_pretrained reads."""
    hf_config = hf_config_from(config)  # refuses what HF T5 cannot describe before writing anything
    tensors = params_to_hf(params, config)
    # transformers ties these to shared.weight; store them too so any loader finds them.
    tensors["encoder.embed_tokens.weight"] = tensors["decoder.embed_tokens.weight"] = tensors["shared.weight"]
    hf_conversion.write_hf_model(directory, hf_config, tensors)


def save_hf_tokenizer(vocabulary: seqio.Vocabulary, directory: str) -> None:
    """Tokenizer files for `vocabulary` that transformers' AutoTokenizer reads: a SentencePiece
    vocabulary as T5Tokenizer (spiece.model), a byte vocabulary as ByT5Tokenizer; both with seqio's
    sentinels (<extra_id_0> is the last id).

    The ids of text agree with seqio's, except after a newline with a SentencePiece model that has
    "\\n" as a piece (t5lite's default): T5Tokenizer starts a new word there ("▁new"), seqio does not."""
    if isinstance(vocabulary, seqio.SentencePieceVocabulary):
        fileio.copy(vocabulary.sentencepiece_model_file, os.path.join(directory, "spiece.model"))
        pieces = vocabulary.tokenizer  # the SentencePiece processor
        # T5Tokenizer assumes <pad> </s> <unk>; name this model's own pieces (t5lite's default has <unk_sp>).
        config = {"tokenizer_class": "T5Tokenizer", "pad_token": pieces.id_to_piece(vocabulary.pad_id),
                  "eos_token": pieces.id_to_piece(vocabulary.eos_id),
                  "unk_token": pieces.id_to_piece(vocabulary.unk_id), "extra_ids": vocabulary.extra_ids}
    elif isinstance(vocabulary, seqio.ByteVocabulary):
        # ByT5Tokenizer's own sentinels count up from the first id after the bytes; seqio's count down
        # from the last id. Name each id explicitly instead.
        special = {0: "<pad>", 1: "</s>", 2: "<unk>",
                   **{vocabulary.vocab_size - 1 - i: f"<extra_id_{i}>" for i in range(vocabulary.extra_ids)}}
        config = {"tokenizer_class": "ByT5Tokenizer", "extra_ids": 0,
                  "additional_special_tokens": [f"<extra_id_{i}>" for i in range(vocabulary.extra_ids)],
                  "added_tokens_decoder": {str(i): {"content": token, "lstrip": False, "normalized": False,
                                                    "rstrip": False, "single_word": False, "special": True}
                                           for i, token in special.items()}}
    else:
        raise UserError(f"No Hugging Face tokenizer for a {type(vocabulary).__name__}; only SentencePiece and "
                        "byte vocabularies export.")
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def export_checkpoint(checkpoint: str, output: str) -> str:
    """Writes the params of a training checkpoint (MODEL_DIR/checkpoints/<step>) and the tokenizer of
    its vocabulary to the new directory `output`. Clears and re-parses gin (MODEL_DIR/config.gin)."""
    config, params, vocabulary = hf_conversion.read_checkpoint_to_export(checkpoint, output)
    save_hf_t5(params, config, output)
    save_hf_tokenizer(vocabulary, output)
    return output


# What a MODEL_DIR imported from Hugging Face records of its model (config.gin).
_IMPORTED_FIELDS = ("architecture", "vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim", "num_encoder_layers",
                    "num_decoder_layers", "relpos_num_buckets", "relpos_max_distance", "tie_embeddings", "scan_layers")


def import_hf_t5(directory: str, output: str) -> str:
    """Writes the HF T5 model in `directory` as the t5lite MODEL_DIR `output` (a new directory):
    checkpoints/0 (params, step 0), config.gin (its TransformerConfig) and, if `directory` has a
    spiece.model, a copy of it and vocabulary.json naming it (with tokenizer_config.json's
    extra_ids, default 100, as sentinels), so fine-tuning and evaluation check their data's
    vocabulary against it."""
    if fileio.exists(output):
        raise UserError(f"{output} already exists; choose a new --output directory.")
    config, params = load_hf_t5(directory)
    vocabulary = _hf_sentencepiece_vocabulary(directory, config)
    output = hf_conversion.write_model_dir(
        output, params, config, _IMPORTED_FIELDS,
        f"The model of the Hugging Face T5 in {os.path.abspath(directory)} (t5lite.hf_t5 --from_hf).", vocabulary)
    if vocabulary is None:
        print(f"{directory} has no spiece.model: {output} records no vocabulary, so nothing checks that fine-tuning "
              "data is tokenized as the model was.", file=sys.stderr)
    return output


def _hf_sentencepiece_vocabulary(directory: str, config: TransformerConfig) -> seqio.SentencePieceVocabulary | None:
    path = os.path.join(directory, "spiece.model")
    if not os.path.exists(path):
        return None
    extra_ids = 100  # T5Tokenizer's default
    tokenizer_config = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(tokenizer_config):
        extra_ids = hf_conversion.read_json(tokenizer_config).get("extra_ids", extra_ids)
    vocabulary = seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
    hf_conversion.fits_embedding(vocabulary, path, config)
    return vocabulary


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = hf_conversion.parse_args(argv, __doc__, "T5")
    if args.checkpoint:
        path = export_checkpoint(args.checkpoint, args.output)
    else:
        path = import_hf_t5(args.from_hf, args.output)
    hf_conversion.report(args, path, "T5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
