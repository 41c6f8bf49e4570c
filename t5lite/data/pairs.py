"""Preference pairs as model features: one row per pair, the prompt once and each answer's features.

A preference Task (tasks.add_preference_task) has the features inputs (the prompt), chosen and
rejected. PairFeatureConverter turns each example into the two rows the instruction path would make
of (prompt, chosen) and (prompt, rejected), with seqio's own unpacked converter for the model, and
puts them side by side in one row of model features:

    encoder_decoder  encoder_input_tokens [inputs]; {chosen,rejected}_decoder_{target_tokens,
                     input_tokens,loss_weights} [targets]
    prefix_lm        {chosen,rejected}_decoder_{target_tokens,input_tokens,loss_weights,
                     causal_attention} [inputs + targets]: the prompt attended both ways, no loss on it
    decoder_only     as prefix_lm without decoder_causal_attention: the prompt read causally

A row holds a whole pair, so sharding the batch over the data axes or splitting it into microbatches
never separates the two answers (t5lite.preference pairs them up again in the step). Pairs are never
packed. The task's length of "targets" applies to both answers.
"""

from collections.abc import Mapping

import seqio
import tensorflow as tf

SIDES = ("chosen", "rejected")  # feature prefixes of the answers (as t5lite.preference.SIDES)
TASK_FEATURES = ("inputs", *SIDES)
ANSWER_CONVERTERS: dict[str, type[seqio.FeatureConverter]] = {
    "encoder_decoder": seqio.EncDecFeatureConverter,
    "prefix_lm": seqio.PrefixLMFeatureConverter,
    "decoder_only": seqio.PrefixLMFeatureConverter,  # decoder_causal_attention dropped below
}
_CAUSAL_ATTENTION = "decoder_causal_attention"


def task_feature_lengths(lengths: Mapping[str, int]) -> dict[str, int]:
    """A run's {"inputs", "targets"} lengths -> the pair task's {"inputs", "chosen", "rejected"}."""
    return {"inputs": lengths.get("inputs", 0), **{side: lengths.get("targets", 0) for side in SIDES}}


class PairFeatureConverter(seqio.FeatureConverter):
    """Pair examples {inputs, chosen, rejected} -> one row of both answers' model features (see above).

    model_type: "encoder_decoder", "prefix_lm" or "decoder_only". pack is accepted for the pipeline's
    uniform call and ignored: pairs are never packed."""

    TASK_FEATURES = {name: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32) for name in TASK_FEATURES}
    PACKING_FEATURE_DTYPES = {}

    def __init__(self, model_type: str, pack: bool = False):
        del pack
        self._answer_converter = ANSWER_CONVERTERS[model_type](pack=False)
        self._causal_prompt = model_type == "decoder_only"
        answer_features = {k: v for k, v in self._answer_converter.MODEL_FEATURES.items()
                           if not (self._causal_prompt and k == _CAUSAL_ATTENTION)}
        self._shared = sorted(k for k in answer_features if k.startswith("encoder_"))
        self._per_answer = sorted(k for k in answer_features if not k.startswith("encoder_"))
        self.MODEL_FEATURES = {**{k: answer_features[k] for k in self._shared},
                               **{f"{side}_{k}": answer_features[k] for side in SIDES for k in self._per_answer}}
        super().__init__(pack=False)

    def _answer_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        if task_feature_lengths["chosen"] != task_feature_lengths["rejected"]:
            raise ValueError(f"chosen and rejected need one length, got {dict(task_feature_lengths)}.")
        return {"inputs": task_feature_lengths["inputs"], "targets": task_feature_lengths["chosen"]}

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        def two_rows(example):
            row = lambda side: tf.data.Dataset.from_tensors({"inputs": example["inputs"], "targets": example[side]})
            return row("chosen").concatenate(row("rejected"))

        rows = self._answer_converter(ds.flat_map(two_rows), self._answer_lengths(task_feature_lengths))
        return rows.batch(2, drop_remainder=True).map(self._pair_row, num_parallel_calls=tf.data.AUTOTUNE)

    def _pair_row(self, rows: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Two converted rows [2, length] (chosen, rejected) -> one row of pair features."""
        pair = {k: rows[k][0] for k in self._shared}
        for i, side in enumerate(SIDES):
            pair.update({f"{side}_{k}": rows[k][i] for k in self._per_answer})
        return pair

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        lengths = self._answer_converter.get_model_feature_lengths(self._answer_lengths(task_feature_lengths))
        return {**{k: lengths[k] for k in self._shared},
                **{f"{side}_{k}": lengths[k] for side in SIDES for k in self._per_answer}}
