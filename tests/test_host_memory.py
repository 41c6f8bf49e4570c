"""The CPU malloc settings t5lite's entry points restart with (t5lite/host_memory.py)."""

import os
import subprocess
import sys
import textwrap

import pytest

from t5lite import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = textwrap.dedent("""
    import ctypes, os, sys
    if __name__ == "__main__":
        from t5lite import host_memory
        host_memory.restart_with_tunables("-m", "probe_entry_point")
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        size = 256 * 2**20  # above glibc's largest mmap threshold: an mmap'd block by default
        block = libc.malloc(ctypes.c_size_t(size))
        ctypes.memset(block, 1, size)
        huge_kb = [int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages")]
        print(os.environ.get("GLIBC_TUNABLES"), os.getpid(), " ".join(sys.argv[1:]), huge_kb[0])
""")


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "unknown"
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.skipif(not host_memory.wanted({"JAX_PLATFORMS": "cpu"}), reason="needs Linux with glibc")
def test_an_entry_point_restarts_once_with_the_tunables_and_malloc_then_uses_huge_pages(tmp_path):
    (tmp_path / "probe_entry_point.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "T5LITE_MALLOC_TUNABLES")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, str(tmp_path)]))

    def run(extra_env):
        proc = subprocess.Popen([sys.executable, "-m", "probe_entry_point", "--flag=1", "two words"],
                                env={**env, **extra_env}, stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        tunables, pid, args_and_kb = out.split(" ", 2)
        args, huge_kb = args_and_kb.rsplit(" ", 1)
        return tunables, int(pid), args, int(huge_kb), proc.pid

    tunables, pid, args, huge_kb, child_pid = run({})
    assert tunables == host_memory.TUNABLES
    assert pid == child_pid and args == "--flag=1 two words"  # exec'd in place, arguments kept
    opted_out = run({"T5LITE_MALLOC_TUNABLES": "0"})
    assert opted_out[0] == "None"
    if _thp_mode() == "madvise":  # glibc madvises its heap only under hugetlb=1
        assert huge_kb >= 128 * 1024 and opted_out[3] == 0


def test_no_restart_when_the_user_set_tunables_opted_out_or_runs_on_an_accelerator():
    base = {"JAX_PLATFORMS": "cpu"}
    assert not host_memory.wanted({**base, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert not host_memory.wanted({**base, "T5LITE_MALLOC_TUNABLES": "0"})
    assert not host_memory.wanted({"JAX_PLATFORMS": "tpu"})
    assert not host_memory.wanted({"JAX_PLATFORMS": "cuda,cpu"})
    assert host_memory.process_env({"JAX_PLATFORMS": "tpu"}) == {"JAX_PLATFORMS": "tpu"}
    if host_memory.wanted(base):
        assert host_memory.process_env(base)["GLIBC_TUNABLES"] == host_memory.TUNABLES
