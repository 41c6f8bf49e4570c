"""The initialisation schemes on a deep, narrow T5, with and without learning-rate warmup.

    python bench/init_schemes.py [--steps 300] [--work_dir /tmp/init_schemes_bench] [--schemes t5,scaled,t_fixup]
        [--warmups 0,100] [--learning_rate 3e-3]

Every run is `python -m t5lite.train` in a fresh process, one after another: gin/base.gin with the
T5 v1.1 tiny shape made deep (d_model 64, 2 heads x 32, d_ff 128, 12+12 layers, 4.2M parameters, most
in the embedding and output layer), span corruption on the embedded corpus at batch 16 x (64 input,
16 target) tokens, AdamW at a constant learning rate after a linear warmup of 0 or 100 steps (no
gradient clipping, so nothing hides a blow-up), TransformerConfig.init_scheme the one of the row.
Prints one JSON line per run, then a markdown table: mean train loss over the 25 steps up to each
step shown, the final validation loss (span corruption, both corpora), the steps skipped because the
loss or gradients were not finite, and the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--gin_file=gin/base.gin", "--gin_file=gin/models/t5_1_1_tiny.gin",
         "--gin.TransformerConfig.num_encoder_layers=12", "--gin.TransformerConfig.num_decoder_layers=12"]
REPORTED_STEPS = (25, 50, 100, 200)


def run_command(model_dir: str, scheme: str, warmup: int, steps: int, learning_rate: float) -> list[str]:
    return [sys.executable, "-m", "t5lite.train", *MODEL, f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.TransformerConfig.init_scheme='{scheme}'",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.BATCH_SIZE=16",
            f"--gin.TRAIN_STEPS={steps}", "--gin.LoopConfig.log_every=25",
            "--gin.make_optimizer.name='adamw'", "--gin.make_schedule.name='constant'",
            f"--gin.make_schedule.learning_rate={learning_rate}", f"--gin.make_schedule.warmup_steps={warmup}",
            f"--gin.EvalConfig.every={steps}", "--gin.EvalConfig.batches=4", f"--gin.CheckpointConfig.every={steps}"]


def train(model_dir: str, command: list[str]) -> float:
    """Runs one training command from scratch; -> wall seconds. A failed run stops the benchmark."""
    shutil.rmtree(model_dir, ignore_errors=True)
    start = time.monotonic()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return time.monotonic() - start


def summarize(model_dir: str) -> dict:
    """Train loss at REPORTED_STEPS and the last step, validation loss, skipped steps, from metrics.jsonl."""
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train = {r["step"]: r for r in rows if r["group"] == "train"}
    last = max(train)
    evals = [r["loss"] for r in rows if r["group"].startswith("eval/") and r["step"] == last]
    return {"train_loss": {s: round(train[s]["loss"], 4) for s in (*REPORTED_STEPS, last) if s in train},
            "eval_loss": round(sum(evals) / len(evals), 4) if evals else None,
            "skipped_steps": int(sum(r.get("skipped_steps", 0) for r in train.values()))}


def table(results: list[dict], steps: int) -> str:
    shown = [s for s in REPORTED_STEPS if s < steps] + [steps]
    head = ("| init_scheme | warmup | " + " | ".join(f"loss @{s}" for s in shown)
            + " | val loss | skipped steps | wall |")
    lines = [head, "|" + "---|" * (len(shown) + 5)]
    for r in results:
        losses = " | ".join(f"{r['train_loss'].get(s, float('nan')):.3f}" for s in shown)
        lines.append(f"| {r['scheme']} | {r['warmup']} | {losses} | {r['eval_loss']:.3f} | {r['skipped_steps']} "
                     f"| {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--work_dir", default="/tmp/init_schemes_bench")
    parser.add_argument("--schemes", default="t5,scaled,t_fixup")
    parser.add_argument("--warmups", default="0,100", help="warmup steps, comma separated")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    args = parser.parse_args()
    results = []
    for warmup in (int(w) for w in args.warmups.split(",")):
        for scheme in args.schemes.split(","):
            model_dir = os.path.join(args.work_dir, f"{scheme}_warmup{warmup}")
            wall = train(model_dir, run_command(model_dir, scheme, warmup, args.steps, args.learning_rate))
            results.append({"scheme": scheme, "warmup": warmup, "wall_s": round(wall, 1), **summarize(model_dir)})
            print(json.dumps(results[-1]), flush=True)
    print(table(results, args.steps))


if __name__ == "__main__":
    main()
