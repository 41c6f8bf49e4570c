"""Runs one command as N cooperating JAX processes on this machine (multi-host, simulated on CPU).

    python launch/local.py --num_processes=2 --devices_per_process=2 -- \\
        python -m t5lite.train --gin_file=gin/base.gin --gin.MODEL_DIR=\\"runs/two_hosts\\"

Every process gets K simulated CPU devices and the flags --coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=I appended to the command; their output is streamed with an
"[I] " prefix. If one process fails, the others are stopped and the launcher exits with its code.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(process: subprocess.Popen, prefix: str) -> None:
    for line in process.stdout:
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


def launch(command: Sequence[str], *, num_processes: int, devices_per_process: int) -> int:
    """Starts the processes, streams their output, and returns 0 or the first failure's exit code."""
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                         f"--xla_force_host_platform_device_count={devices_per_process}".strip())
    processes = [
        subprocess.Popen([*command, f"--coordinator_address={address}", f"--num_processes={num_processes}",
                          f"--process_id={i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(num_processes)
    ]
    streams = [threading.Thread(target=_stream, args=(p, f"[{i}] "), daemon=True) for i, p in enumerate(processes)]
    for t in streams:
        t.start()
    failure = 0
    try:
        while None in [p.poll() for p in processes]:  # a list: poll every process, not just the first
            failure = next((p.returncode for p in processes if p.returncode not in (None, 0)), 0)
            if failure:
                break  # a lone survivor would wait for its peers forever
            time.sleep(0.2)
    finally:  # also on Ctrl-C or the launcher's own termination
        _stop(processes)
    for t in streams:
        t.join()
    return failure or next((p.returncode for p in processes if p.returncode), 0)


def _stop(processes: Sequence[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM what still runs, then SIGKILL after `grace_s` (a process blocked in a collective ignores TERM)."""
    for p in processes:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + grace_s
    for p in processes:
        try:
            p.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every process runs")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run launch()'s cleanup when terminated
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    return launch(command, num_processes=args.num_processes, devices_per_process=args.devices_per_process)


if __name__ == "__main__":
    sys.exit(main())
