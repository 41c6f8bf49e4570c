"""Hugging Face Llama interop: LlamaForCausalLM weights in a local directory <-> t5lite's rope family.

    config, params = load_hf_llama("path/to/llama")              # config.json + model.safetensors
    save_hf_llama(params, config, "path/to/export")               # (or pytorch_model.bin on import)

A training checkpoint of a Llama-style model (gin/models/llama_*.gin), as a directory that
transformers' LlamaForCausalLM.from_pretrained and AutoTokenizer.from_pretrained read:

    python -m t5lite.hf_llama --checkpoint=runs/llama/checkpoints/600 --output=hf/llama

And the other way, a Hugging Face Llama directory as a t5lite MODEL_DIR to fine-tune from:

    python -m t5lite.hf_llama --from_hf=path/to/llama --output=runs/llama_imported

The mapping is 1:1, each torch Linear weight [out, in] transposed into a t5lite kernel [in, ...out]:
q/k/v/o_proj are the self-attention's query/key/value/out (k and v with num_key_value_heads heads),
gate/up/down_proj the MLP's wi_0/wi_1/wo, input_layernorm / post_attention_layernorm the pre-attention
and pre-MLP RMSNorm scales, model.norm the final one, lm_head the untied output layer. t5lite's rotary
embeddings use Llama's rotate-half layout, so no weight is permuted. Only the default RoPE (no
rope_scaling such as Llama 3.1's), SiLU, and no attention or MLP biases map onto t5lite.

The tokenizer: a SentencePiece vocabulary (seqio's, sentinels included) exported as tokenizer.json,
loaded by AutoTokenizer as a PreTrainedTokenizerFast, with the SentencePiece model itself as
tokenizer.model. It encodes text to seqio's ids after a BOS of id 0: t5lite's decoder-only models
see token 0 first (the feature converters shift targets right by one 0), so that is the BOS here.
"""

from __future__ import annotations

import base64
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

# HF's default for max_position_embeddings: a RoPE model has no learned table, only a nominal length.
MAX_POSITION_EMBEDDINGS = 2048


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> TransformerConfig:
    """TransformerConfig of a transformers LlamaConfig dict (config.json)."""
    if hf.get("model_type", "llama") != "llama":
        raise UserError(f"Only Llama models (model_type 'llama') map onto t5lite's rope family; this config has "
                        f"model_type {hf.get('model_type')!r}.")
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", (hf.get("rope_scaling") or {}).get("rope_type", "default"))
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (bool(hf.get("attention_bias", False)), False),
        "mlp_bias": (bool(hf.get("mlp_bias", False)), False),
        "rope_type": (rope_type, "default"),
    }
    wrong = {k: have for k, (have, want) in unsupported.items() if have != want}
    if wrong or hf.get("rope_scaling"):
        raise UserError(f"t5lite's rope family maps only Llama with SiLU, no biases and default RoPE; this config has "
                        f"{wrong or {'rope_scaling': hf.get('rope_scaling')}}.")
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    return TransformerConfig(
        architecture="decoder_only", vocab_size=hf["vocab_size"], emb_dim=hf["hidden_size"], num_heads=heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, num_kv_heads=None if kv_heads == heads else kv_heads,
        mlp_dim=hf["intermediate_size"], num_decoder_layers=hf["num_hidden_layers"], position_encoding="rope",
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), mlp_activation="silu",
        layer_norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings")),
        dropout_rate=0.0, **overrides)


def hf_config_from(config: TransformerConfig) -> dict[str, Any]:
    """The config.json of LlamaForCausalLM for `config`; refuses what Llama cannot describe."""
    llama = (not config.is_encoder_decoder and config.position_encoding == "rope" and config.mlp_activation == "silu")
    if not llama:
        raise UserError("Only decoder-only models with position_encoding='rope' and mlp_activation='silu' (gin/models/"
                        "llama_*.gin) export to Hugging Face Llama; T5 v1.1 models export with python -m t5lite.hf_t5.")
    if config.emb_dim % config.num_heads:
        raise UserError(f"Hugging Face Llama needs hidden_size (emb_dim={config.emb_dim}) to be a multiple of "
                        f"num_attention_heads ({config.num_heads}).")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.emb_dim, "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.num_decoder_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS, "rms_norm_eps": config.layer_norm_epsilon,
        # rope_parameters for transformers 5, rope_theta for older versions.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base}, "rope_theta": config.rope_base,
        "tie_word_embeddings": config.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "float32",
    }


# (t5lite module, t5lite param, HF tensor under model.layers.<i>.) of a layer's matmuls.
_KERNELS = (("self_attention", "query", "self_attn.q_proj"), ("self_attention", "key", "self_attn.k_proj"),
            ("self_attention", "value", "self_attn.v_proj"), ("self_attention", "out", "self_attn.o_proj"),
            ("mlp", "wi_0", "mlp.gate_proj"), ("mlp", "wi_1", "mlp.up_proj"), ("mlp", "wo", "mlp.down_proj"))
_NORMS = (("pre_self_attention_layer_norm", "input_layernorm"), ("pre_mlp_layer_norm", "post_attention_layernorm"))


def _kernel_shape(param: str, c: TransformerConfig) -> tuple[int, ...]:
    """The t5lite shape of a kernel; HF's weight is its transpose flattened to 2 dims."""
    return {"query": (c.emb_dim, c.num_heads, c.head_dim), "key": (c.emb_dim, c.kv_heads, c.head_dim),
            "value": (c.emb_dim, c.kv_heads, c.head_dim), "out": (c.num_heads, c.head_dim, c.emb_dim),
            "wi_0": (c.emb_dim, c.mlp_dim), "wi_1": (c.emb_dim, c.mlp_dim), "wo": (c.mlp_dim, c.emb_dim)}[param]


def params_from_hf(hf: dict[str, np.ndarray], config: TransformerConfig) -> Params:
    """t5lite params (nested dicts of float32 numpy) from a HF LlamaForCausalLM state dict of numpy arrays."""
    hf = {k: np.asarray(v, np.float32) for k, v in hf.items()}
    layers = []
    for i in range(config.num_decoder_layers):
        layer: Params = {"self_attention": {}, "mlp": {}}
        for module, param, theirs in _KERNELS:
            layer[module][param] = hf[f"model.layers.{i}.{theirs}.weight"].T.reshape(_kernel_shape(param, config))
        for ours, theirs in _NORMS:
            layer[ours] = {"scale": hf[f"model.layers.{i}.{theirs}.weight"]}
        layers.append(layer)
    decoder = {**stack_layers(layers, config.scan_layers), "decoder_norm": {"scale": hf["model.norm.weight"]}}
    params = {"token_embedder": {"embedding": hf["model.embed_tokens.weight"]}, "decoder": decoder}
    if not config.tie_embeddings:
        params["decoder"]["logits_dense"] = hf["lm_head.weight"].T
    return params


def params_to_hf(params: Params, config: TransformerConfig) -> dict[str, np.ndarray]:
    """A HF LlamaForCausalLM state dict (numpy float32, contiguous) from t5lite params."""
    out = {"model.embed_tokens.weight": np.asarray(params["token_embedder"]["embedding"]),
           "model.norm.weight": np.asarray(params["decoder"]["decoder_norm"]["scale"])}
    for i, layer in enumerate(unstack_layers(params["decoder"], config.num_decoder_layers, config.scan_layers)):
        for module, param, theirs in _KERNELS:
            kernel = np.asarray(layer[module][param])
            fan_in = config.num_heads * config.head_dim if param == "out" else kernel.shape[0]
            out[f"model.layers.{i}.{theirs}.weight"] = kernel.reshape(fan_in, -1).T
        for ours, theirs in _NORMS:
            out[f"model.layers.{i}.{theirs}.weight"] = np.asarray(layer[ours]["scale"])
    out["lm_head.weight"] = (out["model.embed_tokens.weight"] if config.tie_embeddings
                             else np.asarray(params["decoder"]["logits_dense"]).T)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def load_hf_llama(directory: str, **config_overrides: Any) -> tuple[TransformerConfig, Params]:
    """(config, params) from a local HF Llama directory: config.json + model.safetensors or
    pytorch_model.bin, or their shards (with the index transformers writes for large models)."""
    config = config_from_hf(hf_conversion.read_hf_config(directory, "Llama"), **config_overrides)
    state = hf_conversion.read_state_dict(directory)
    try:
        return config, params_from_hf(state, config)
    except KeyError as e:
        raise UserError(f"{directory} lacks the tensor {e} that a Llama model with this config has.") from e


def save_hf_llama(params: Params, config: TransformerConfig, directory: str) -> None:
    """Writes config.json and model.safetensors that LlamaForCausalLM.from_pretrained reads."""
    hf_config = hf_config_from(config)  # refuses what HF Llama cannot describe before writing anything
    hf_conversion.write_hf_model(directory, hf_config, params_to_hf(params, config))


# --- The tokenizer ---------------------------------------------------------------------------------------

def tokenizer_json(vocabulary: seqio.SentencePieceVocabulary, bos_id: int = 0) -> dict[str, Any]:
    """A Hugging Face `tokenizers` description (tokenizer.json) of a SentencePiece vocabulary with
    seqio's sentinels (seqio adds them to the model as pieces "▁<extra_id_N>"), encoding as SentencePiece
    does and adding `bos_id` first.

    SentencePiece's text handling, as tokenizers steps: its normalization table (Precompiled), the
    leading and trailing spaces removed and inner runs of spaces made one, "▁" for every space and
    one in front, then pieces within whitespace-separated words (Metaspace) by the same Unigram
    scores. User-defined pieces ("\\n", "<unk>" in t5lite's default; the sentinels) stay ordinary
    pieces of the Unigram model (SentencePiece matches them the same way: they score 0, above every
    learned piece); control and unknown pieces (pad, eos, unk) are special added tokens.
    """
    from sentencepiece import sentencepiece_model_pb2  # noqa: PLC0415

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(vocabulary.sp_model)
    if model.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        raise UserError("Only unigram SentencePiece models (t5lite's default, and train_vocab's) export as a "
                        f"Hugging Face tokenizer.json; this one is {model.trainer_spec.model_type}.")
    special_types = (sentencepiece_model_pb2.ModelProto.SentencePiece.UNKNOWN,
                     sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL)
    added = [{"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, p in enumerate(model.pieces) if p.type in special_types]
    spec = model.normalizer_spec
    normalizers: list[dict[str, Any]] = []
    if spec.precompiled_charsmap:
        normalizers.append({"type": "Precompiled",
                            "precompiled_charsmap": base64.b64encode(spec.precompiled_charsmap).decode()})
    if spec.remove_extra_whitespaces:  # \A and \z: the whole text's ends (^ and $ would match at every newline)
        normalizers += [{"type": "Replace", "pattern": {"Regex": r"\A +| +\z"}, "content": ""},
                        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    if spec.add_dummy_prefix:
        normalizers.append({"type": "Prepend", "prepend": "▁"})
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    bos = model.pieces[bos_id].piece
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never", "split": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "Unigram", "unk_id": model.trainer_spec.unk_id,
                  "byte_fallback": model.trainer_spec.byte_fallback,
                  "vocab": [[p.piece, p.score] for p in model.pieces]},
    }


def save_hf_tokenizer(vocabulary: seqio.Vocabulary, directory: str) -> None:
    """tokenizer.json, tokenizer_config.json (PreTrainedTokenizerFast, BOS id 0 added, no EOS) and the
    SentencePiece model as tokenizer.model, for a SentencePiece vocabulary; see tokenizer_json.

    (LlamaTokenizer would rebuild the tokenizer as byte-pair encoding from tokenizer.model, wrong for
    a unigram model; PreTrainedTokenizerFast reads tokenizer.json as it is.)"""
    if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
        raise UserError(f"No Hugging Face Llama tokenizer for a {type(vocabulary).__name__}; only SentencePiece "
                        "vocabularies export with t5lite.hf_llama.")
    description = tokenizer_json(vocabulary)
    pieces = vocabulary.tokenizer  # the SentencePiece processor
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": pieces.id_to_piece(0),
              "eos_token": pieces.id_to_piece(vocabulary.eos_id), "unk_token": pieces.id_to_piece(vocabulary.unk_id),
              "pad_token": pieces.id_to_piece(vocabulary.pad_id), "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": MAX_POSITION_EMBEDDINGS,
              "extra_ids": vocabulary.extra_ids}  # t5lite's own key: the import rebuilds seqio's vocabulary
    fileio.copy(vocabulary.sentencepiece_model_file, os.path.join(directory, "tokenizer.model"))
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(description, f, ensure_ascii=False)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


# --- Checkpoints and MODEL_DIRs --------------------------------------------------------------------------

def export_checkpoint(checkpoint: str, output: str) -> str:
    """Writes the params of a training checkpoint (MODEL_DIR/checkpoints/<step>) and the tokenizer of
    its vocabulary to the new directory `output`. Clears and re-parses gin (MODEL_DIR/config.gin)."""
    config, params, vocabulary = hf_conversion.read_checkpoint_to_export(checkpoint, output)
    hf_config_from(config)  # refuse before writing anything
    if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
        raise UserError(f"{checkpoint} was trained with a {type(vocabulary).__name__}; only SentencePiece "
                        "vocabularies export with t5lite.hf_llama.")
    save_hf_llama(params, config, output)
    save_hf_tokenizer(vocabulary, output)
    return output


# What a MODEL_DIR imported from Hugging Face records of its model (config.gin).
_IMPORTED_FIELDS = ("architecture", "vocab_size", "emb_dim", "num_heads", "head_dim", "num_kv_heads", "mlp_dim",
                    "num_decoder_layers", "position_encoding", "rope_base", "mlp_activation", "layer_norm_epsilon",
                    "tie_embeddings", "scan_layers")


def import_hf_llama(directory: str, output: str) -> str:
    """Writes the HF Llama model in `directory` as the t5lite MODEL_DIR `output` (a new directory):
    checkpoints/0, config.gin and, when `directory` has a tokenizer.model with t5lite's ids (pad 0,
    EOS 1; as this module exports it), a copy of it and vocabulary.json naming it (with
    tokenizer_config.json's extra_ids, default 0, as sentinels)."""
    if fileio.exists(output):
        raise UserError(f"{output} already exists; choose a new --output directory.")
    config, params = load_hf_llama(directory)
    vocabulary = _hf_sentencepiece_vocabulary(directory, config)
    output = hf_conversion.write_model_dir(
        output, params, config, _IMPORTED_FIELDS,
        f"The model of the Hugging Face Llama in {os.path.abspath(directory)} (t5lite.hf_llama --from_hf).",
        vocabulary)
    if vocabulary is None:
        print(f"{directory} has no tokenizer.model with t5lite's ids (pad 0, EOS 1; t5lite's decoder-only models "
              f"also read 0 as the first token): {output} records no vocabulary, so nothing checks that fine-tuning "
              "data is tokenized as the model was.", file=sys.stderr)
    return output


def _hf_sentencepiece_vocabulary(directory: str, config: TransformerConfig) -> seqio.SentencePieceVocabulary | None:
    path = os.path.join(directory, "tokenizer.model")
    if not os.path.exists(path):
        return None
    tokenizer_config = os.path.join(directory, "tokenizer_config.json")
    extra_ids = 0
    if os.path.exists(tokenizer_config):
        extra_ids = hf_conversion.read_json(tokenizer_config).get("extra_ids", 0)
    vocabulary = seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
    if vocabulary.tokenizer.pad_id() != 0 or vocabulary.eos_id != 1:
        return None  # e.g. Llama 2's: unk 0, bos 1, eos 2
    hf_conversion.fits_embedding(vocabulary, path, config)
    return vocabulary


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = hf_conversion.parse_args(argv, __doc__, "Llama")
    if args.checkpoint:
        path = export_checkpoint(args.checkpoint, args.output)
    else:
        path = import_hf_llama(args.from_hf, args.output)
    hf_conversion.report(args, path, "Llama")
    return 0


if __name__ == "__main__":
    sys.exit(main())
