"""Scored rows per second, t5lite against lm-evaluation-harness, on the same model and rows, in one run.

    export T5LITE_DATA_DIR=../shared/data
    python bench/harness_speed.py --model_dir=runs/base --tasks=arc_easy,boolq,winogrande
    python bench/harness_speed.py --model_dir=runs/base --gin_file=gin/models/t5_1_1_small.gin --num_examples=2000

The latest checkpoint of MODEL_DIR is exported with t5lite.hf_t5; `python -m t5lite.eval` scores the tasks
(gin/runs/benchmarks.gin; rows/s from the seconds its table reports per task: scoring only, compiled once);
then lm-evaluation-harness (HFLM, seq2seq, the same device kind: CPU here) scores the same (prompt,
continuation) pairs, read back from t5lite's per-example records, encoded as seqio encodes them (see
tests/test_benchmarks.py for why). Prints per task: rows, rows/s of each, the ratio, and the largest
log-likelihood difference (the scores must agree).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--tasks", default="arc_easy,arc_challenge,boolq,winogrande,truthfulqa_mc1")
    parser.add_argument("--gin_file", action="append", default=[], help="the model's gin files, as for eval")
    parser.add_argument("--num_examples", type=int, default=None, help="rows per task (default: all)")
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args(argv)

    import gin
    import seqio
    import tensorflow as tf
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from t5lite import checkpoints, hf_t5
    from t5lite import eval as eval_lib
    from t5lite.data.vocab import get_default_vocabulary

    tasks = args.tasks.split(",")
    checkpoints_dir = os.path.join(args.model_dir, "checkpoints")
    step = checkpoints.latest_checkpoint_step(checkpoints_dir)
    work = tempfile.mkdtemp(prefix="t5lite-harness-speed-")
    export = os.path.join(work, "hf")
    hf_t5.main([f"--checkpoint={checkpoints_dir}/{step}", f"--output={export}"])
    mixture = "bench_harness_speed_" + "_".join(tasks)
    if mixture not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(mixture, tasks, default_rate=1.0)
    eval_dir = os.path.join(work, "eval")
    assert eval_lib.main(["--gin_file=gin/runs/benchmarks.gin", *[f"--gin_file={g}" for g in args.gin_file],
                          f"--gin.MODEL_DIR='{args.model_dir}'", f"--gin.SUITE='{mixture}'",
                          f"--gin.evaluate.output_dir='{eval_dir}'", f"--gin.evaluate.batch_size={args.batch_size}",
                          f"--gin.evaluate.num_examples={args.num_examples}"]) == 0
    gin.clear_config()
    with open(os.path.join(eval_dir, f"benchmarks_step_{step}.json")) as f:
        t5lite_seconds = {r["task"]: r["seconds"] for r in json.load(f)["rows"] if r["seconds"]}

    model = transformers.T5ForConditionalGeneration.from_pretrained(export).eval()
    model.config.tie_word_embeddings = False  # see tests/test_benchmarks.py: else HFLM ties lm_head
    lm = HFLM(pretrained=model, tokenizer=transformers.AutoTokenizer.from_pretrained(export), backend="seq2seq",
              device="cpu", batch_size=args.batch_size, max_length=512)
    vocabulary = get_default_vocabulary()

    # The harness encodes as seqio does (see tests/test_benchmarks.py), from a cache filled before the clock
    # starts: seqio's TensorFlow op called once per string is slower than a Hugging Face tokenizer, and the
    # harness should not be charged for it (t5lite's figure does not include tokenizing either).
    @functools.cache
    def encode(string, add_special_tokens=None, left_truncate_len=None):
        eos = [1] if add_special_tokens is not False else []
        ids = vocabulary.encode_tf(tf.constant(string)).numpy().tolist() + eos
        return ids[-(left_truncate_len or 10**9):]

    lm.tok_encode = lambda string, add_special_tokens=None, left_truncate_len=None, **kw: list(
        encode(string, add_special_tokens, left_truncate_len))
    print(f"{'task':<16}{'rows':>7}{'t5lite rows/s':>15}{'harness rows/s':>16}{'ratio':>7}{'max |dll|':>11}")
    for task in tasks:
        with open(os.path.join(eval_dir, f"examples_step_{step}", f"{task}.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        requests = [Instance(request_type="loglikelihood", doc={}, arguments=(r["inputs"], r["targets"]), idx=0)
                    for r in rows]
        for r in requests:
            lm._encode_pair(*r.arguments)  # fills the encode cache, as the harness will call it
        t0 = time.perf_counter()
        lls = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
        harness_rate = len(rows) / (time.perf_counter() - t0)
        t5lite_rate = len(rows) / t5lite_seconds[task]
        difference = max(abs(r["score"] - ll) for r, ll in zip(rows, lls, strict=True))
        print(f"{task:<16}{len(rows):>7}{t5lite_rate:>15.1f}{harness_rate:>16.1f}{t5lite_rate / harness_rate:>7.2f}"
              f"{difference:>11.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
