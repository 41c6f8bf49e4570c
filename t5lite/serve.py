"""Serve a trained model over an OpenAI-compatible HTTP API, with continuous batching.

    python -m t5lite.serve --model_dir=runs/base
    python -m t5lite.serve --model_dir=runs/base --port=8000 --api_key_file=key.txt --watch \\
        --gin.ServeConfig.slots=16 --gin.ServeConfig.max_new_tokens=128

The model is built from MODEL_DIR/config.gin (the training run's bindings; an export by
t5lite.finetune or t5lite.hf_t5 --import writes one too), then --gin_file / --gin. flags, which also
set the limits (ServeConfig, t5lite/serving/server.py). It serves the latest checkpoint of MODEL_DIR
(or --checkpoint_step) with the vocabulary MODEL_DIR/vocabulary.json records. /healthz answers at
once; every program is compiled before /readyz says ready. --watch loads newer checkpoints while
serving (requests in flight finish on the old parameters). SIGTERM or Ctrl-C: stop accepting, finish
the requests in flight, exit 0. Request log and feedback: SERVE_DIR/requests.jsonl, feedback.jsonl
(default SERVE_DIR: MODEL_DIR/serve). See docs/serving.md.
"""

from __future__ import annotations

if __name__ == "__main__":
    import sys

    from t5lite import serve as _serve_module  # register gin configurables once, not as __main__.*

    sys.exit(_serve_module.main())

import argparse
import os
import sys
import threading
import time
import traceback
from collections.abc import Sequence

import gin
import jax

from t5lite import checkpoints, compilation_cache, fileio, gin_cli, partitioning, run_dir, trainer
from t5lite.data import vocab_record
from t5lite.data.vocab import get_default_vocabulary
from t5lite.errors import UserError, reports_user_errors
from t5lite.model.config import TransformerConfig
from t5lite.model.models import Model
from t5lite.serving.engine import Engine
from t5lite.serving.server import ServeConfig, ServerState, Tokenizer, build_app


def parse_flags(argv: Sequence[str]) -> tuple[argparse.Namespace, argparse.Namespace, list[str]]:
    """(serve flags, gin_cli flags, gin bindings)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="a t5lite MODEL_DIR (its checkpoints/ and config.gin)")
    parser.add_argument("--checkpoint_step", type=int, default=None, help="serve this step (default: the latest)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key_file", default=None, help="a file holding the API key clients must send")
    parser.add_argument("--watch", action="store_true", help="serve newer checkpoints of MODEL_DIR as they appear")
    parser.add_argument("--watch_interval_s", type=float, default=30.0)
    parser.add_argument("--serve_dir", default=None, help="request and feedback logs (default MODEL_DIR/serve)")
    parser.add_argument("--name", default=None, help="the model's name in the API (default: MODEL_DIR's name)")
    parser.add_argument("--drain_timeout_s", type=float, default=None,
                        help="on SIGTERM, cancel requests still running after this long (default: wait)")
    args, rest = parser.parse_known_args(argv)
    gin_args, bindings = gin_cli.parse_args(rest, description=__doc__)
    return args, gin_args, bindings


def configure_gin(model_dir: str, gin_args: argparse.Namespace, bindings: list[str]) -> None:
    config_path = run_dir.path(model_dir, run_dir.CONFIG)
    if fileio.exists(config_path):
        gin_cli.parse_run_config(config_path)
        if gin_args.gin_file:
            gin_cli.parse_gin(gin_args.gin_file, bindings, gin_cli.search_paths(gin_args))
        elif bindings:
            try:
                gin.parse_config(bindings)
            except (ValueError, KeyError, SyntaxError, ImportError) as e:
                raise gin_cli.GinConfigError(f"gin configuration error: {e}") from e
    elif gin_args.gin_file:
        gin_cli.parse_gin(gin_args.gin_file, bindings, gin_cli.search_paths(gin_args))
    else:
        raise UserError(f"{config_path} does not exist: pass the MODEL_DIR of a t5lite run, or describe the model "
                        "with --gin_file (e.g. --gin_file=gin/base.gin --gin_file=gin/models/t5_1_1_tiny.gin).")


def read_api_key(path: str | None) -> str | None:
    if path is None:
        return None
    if not os.path.isfile(path):
        raise UserError(f"--api_key_file {path!r} does not exist.")
    with open(path, encoding="utf-8") as f:
        key = f.read().strip()
    if len(key) < 8:
        raise UserError(f"--api_key_file {path!r} holds {len(key)} characters; use a key of at least 8.")
    return key


class Loader:
    """Restores checkpoints of MODEL_DIR onto the mesh (at start-up and for --watch)."""

    def __init__(self, model: Model, checkpoints_dir: str, preset: str):
        self.model, self.checkpoints_dir = model, checkpoints_dir
        self.mesh = partitioning.make_mesh() if preset == "dp" else partitioning.make_mesh(
            data=1, tensor=jax.device_count())
        self.rules = partitioning.axis_rules(preset)
        self.abstract = trainer.abstract_params(model, self.mesh, self.rules)

    def latest_step(self) -> int:
        return checkpoints.latest_checkpoint_step(self.checkpoints_dir)

    def restore(self, step: int):
        return checkpoints.restore_params(self.checkpoints_dir, step, self.abstract)


def watch(loader: Loader, state: ServerState, interval_s: float, stop: threading.Event) -> None:
    """Loads each newer checkpoint and hands it to the engine (which swaps between requests)."""
    while not stop.wait(interval_s):
        engine = state.engine
        try:
            step = loader.latest_step()
            if step == engine.params_step or (engine.params_step is not None and step < engine.params_step):
                continue
            print(f"serve: loading checkpoint {step}", flush=True)
            engine.swap_params(loader.restore(step), step)
        except Exception:  # noqa: BLE001  a checkpoint being written or damaged: keep serving, retry later
            traceback.print_exc()


def start_engine(args: argparse.Namespace, config: ServeConfig, state: ServerState, stop: threading.Event) -> None:
    """Loads, places and compiles the model, then marks the server ready (on a thread: /healthz answers meanwhile)."""
    try:
        model_dir = fileio.absolute(args.model_dir)
        checkpoints_dir, step = checkpoints.resolve_checkpoint_path(model_dir)
        model = Model(TransformerConfig())
        loader = Loader(model, checkpoints_dir, config.partitioning_preset)
        step = args.checkpoint_step if args.checkpoint_step is not None else (step or loader.latest_step())
        vocabulary = vocab_record.trained_vocabulary(run_dir.model_dir_of(checkpoints_dir)) or get_default_vocabulary()
        if vocabulary.vocab_size > model.config.vocab_size:
            raise UserError(f"The vocabulary has {vocabulary.vocab_size} ids but the model {model.config.vocab_size} "
                            "embedding rows: serve with the gin files the model was trained with.")
        tokenizer = Tokenizer(encode=lambda text: list(vocabulary.encode(text)),
                              decode=lambda ids: vocabulary.decode(list(ids)), eos_id=vocabulary.eos_id)
        started = time.perf_counter()
        engine = Engine(model, loader.restore(step), step=step, config=config.engine_config(vocabulary.eos_id),
                        mesh=loader.mesh, rules=loader.rules, observe_step=state.observe_step)
        engine.start()
        state.ready(engine, tokenizer)
        mesh = " x ".join(f"{name} {size}" for name, size in loader.mesh.shape.items() if size > 1) or "one device"
        print(f"serve: ready: checkpoint {step}, {config.slots} slots, {config.partitioning_preset} on {mesh}, "
              f"compiled in {time.perf_counter() - started:.1f} s", flush=True)
        if args.watch:
            threading.Thread(target=watch, args=(loader, state, args.watch_interval_s, stop), daemon=True).start()
    except UserError as e:
        state.failed = f"error: {e}"
        print(state.failed, file=sys.stderr, flush=True)
        os.kill(os.getpid(), 15)  # stop the HTTP server; main() exits 2
    except Exception:  # noqa: BLE001
        state.failed = "start-up failed"
        traceback.print_exc()
        os.kill(os.getpid(), 15)


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn  # the server's own dependency, imported where it is used

    args, gin_args, bindings = parse_flags(sys.argv[1:] if argv is None else argv)
    if not fileio.isdir(args.model_dir):
        raise UserError(f"--model_dir {args.model_dir!r} does not exist; pass the MODEL_DIR of a t5lite run.")
    compilation_cache.enable(gin_args.compilation_cache_dir)
    configure_gin(args.model_dir, gin_args, bindings)
    config = ServeConfig()
    if config.partitioning_preset not in ("dp", "tp"):
        raise UserError(f"ServeConfig.partitioning_preset={config.partitioning_preset!r}; choose 'dp' or 'tp'.")
    api_key = read_api_key(args.api_key_file)
    serve_dir = args.serve_dir or os.path.join(args.model_dir, "serve")
    name = args.name or os.path.basename(os.path.abspath(args.model_dir).rstrip("/"))
    state = ServerState(config, model_name=name, serve_dir=serve_dir, api_key=api_key)
    stop = threading.Event()

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.draining = True  # /readyz fails and new completions get 503 while in-flight ones finish
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after shutting down (killing the process); a drained
            # server exits 0 instead.
            self._captured_signals.clear()

    server = Server(uvicorn.Config(build_app(state), host=args.host, port=args.port, log_level="warning",
                                   timeout_graceful_shutdown=args.drain_timeout_s, lifespan="off"))
    threading.Thread(target=start_engine, args=(args, config, state, stop), daemon=True).start()
    print(f"serve: listening on http://{args.host}:{args.port} (ready once compiled: /readyz)", flush=True)
    server.run()
    stop.set()
    if state.engine is not None:
        state.engine.stop()
    if state.failed:
        return 2
    print("serve: stopped", flush=True)
    return 0
