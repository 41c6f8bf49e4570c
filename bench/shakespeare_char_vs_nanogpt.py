"""Wall time to a validation loss: t5lite's gin/runs/shakespeare_char.gin against nanoGPT's baby GPT.

    python bench/shakespeare_char_vs_nanogpt.py --nanogpt_dir PATH_TO_A_NANOGPT_CHECKOUT
        [--input ../shared/data/tinyshakespeare/input.txt] [--work_dir /tmp/shakespeare_bench]
        [--order nanogpt,t5lite]

Both runs start from the command line, in this order, one after another on the same machine, each
as a fresh process (start-up, data preparation inside the run and every evaluation counted):
  nanoGPT  its README's CPU command: `train.py config/train_shakespeare_char.py --device=cpu
           --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
           --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`
           after its `data/shakespeare_char/prepare.py` (given the input file, so nothing is downloaded;
           the preparation is not timed). PyTorch from this interpreter's environment.
  t5lite   `python -m t5lite.train --gin_file=gin/runs/shakespeare_char.gin` (the compilation cache
           as the machine has it: run the script twice to see a warm cache).
Each console line is time-stamped as it arrives. nanoGPT prints `step N: train loss A, val loss B`
every 250 iterations (val loss on 20 random batches of 12 windows); t5lite prints an eval line every
250 steps (cross entropy over the whole validation split; z-loss is 0 in this run, so the printed
loss is the cross entropy). The goal (issue 22): t5lite reaches nanoGPT's final validation loss in
less wall time than nanoGPT's whole run. Prints one JSON line per run and the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NANOGPT_FLAGS = ("--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 "
                 "--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0").split()
NANOGPT_EVAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
T5LITE_EVAL = re.compile(r"^\s+eval \S+: loss ([\d.]+)")


def timed_lines(cmd: list[str], cwd: str, env: dict | None = None) -> tuple[float, list[tuple[float, str]]]:
    """Runs cmd; -> (wall seconds, [(seconds since start, line)]). Fails loudly if the run fails."""
    start = time.monotonic()
    lines = []
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")  # lines arrive as printed
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        for line in proc.stdout:
            lines.append((time.monotonic() - start, line.rstrip("\n")))
    wall = time.monotonic() - start
    if proc.returncode != 0:
        tail = "\n".join(line for _, line in lines[-30:])
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return wall, lines


def run_nanogpt(nanogpt_dir: str, input_path: str, work_dir: str) -> dict:
    copy = os.path.join(work_dir, "nanogpt")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(nanogpt_dir, copy, ignore=shutil.ignore_patterns(".git"))
    data_dir = os.path.join(copy, "data", "shakespeare_char")
    shutil.copy(input_path, os.path.join(data_dir, "input.txt"))  # prepare.py downloads only when missing
    subprocess.run([sys.executable, "prepare.py"], cwd=data_dir, check=True, stdout=subprocess.DEVNULL)
    wall, lines = timed_lines([sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_FLAGS], copy)
    evals = [(t, int(m[1]), float(m[3])) for t, line in lines if (m := NANOGPT_EVAL.match(line))]
    return {"run": "nanoGPT", "wall_s": round(wall, 1), "evals": evals}


def run_t5lite(work_dir: str) -> dict:
    model_dir = os.path.join(work_dir, "t5lite_run")
    shutil.rmtree(model_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "t5lite.train", "--gin_file=gin/runs/shakespeare_char.gin",
           f"--gin.MODEL_DIR='{model_dir}'"]
    wall, lines = timed_lines(cmd, REPO)
    eval_lines = [(t, float(m[1])) for t, line in lines if (m := T5LITE_EVAL.match(line))]
    first_step = next((t for t, line in lines if line.startswith("step ")), None)
    # Evals run every 250 steps (EvalConfig.every in the gin file); the i-th eval line is step 250 * i.
    evals = [(t, 250 * (i + 1), loss) for i, (t, loss) in enumerate(eval_lines)]
    return {"run": "t5lite", "wall_s": round(wall, 1), "first_progress_line_s": first_step, "evals": evals}


def seconds_to(evals: list[tuple[float, int, float]], loss: float) -> tuple[float, int] | None:
    """The first eval at or below `loss`: (seconds since the command, step)."""
    return next(((t, step) for t, step, value in evals if value <= loss), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt_dir", required=True, help="a checkout of github.com/karpathy/nanoGPT")
    default_input = os.path.join(os.environ.get("T5LITE_DATA_DIR", os.path.join(REPO, "..", "shared", "data")),
                                 "tinyshakespeare", "input.txt")
    parser.add_argument("--input", default=default_input)
    parser.add_argument("--work_dir", default="/tmp/shakespeare_bench")
    parser.add_argument("--order", default="nanogpt,t5lite")
    args = parser.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    results = {}
    for name in args.order.split(","):
        if name == "nanogpt":
            result = run_nanogpt(args.nanogpt_dir, args.input, args.work_dir)
        else:
            result = run_t5lite(args.work_dir)
        results[name] = result
        print(json.dumps(result), flush=True)
    nano, ours = results["nanogpt"], results["t5lite"]
    target = nano["evals"][-1][2]
    reached = seconds_to(ours["evals"], target)
    summary = {"nanogpt_final_val_loss": target, "nanogpt_wall_s": nano["wall_s"],
               "t5lite_final_val_loss": ours["evals"][-1][2], "t5lite_wall_s": ours["wall_s"],
               "t5lite_s_to_nanogpt_loss": reached and round(reached[0], 1),
               "t5lite_step_at_that_loss": reached and reached[1]}
    if reached:
        summary["ratio_nanogpt_wall_over_t5lite_time_to_loss"] = round(nano["wall_s"] / reached[0], 2)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
