"""t5lite: pretrain, evaluate and fine-tune T5-style and decoder-only language models in JAX."""

import importlib.util
import os
import sys

# TensorFlow (used by seqio for the input pipeline only) must not log device chatter or claim
# accelerator memory that JAX needs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Settings by which a user already chose JAX's platforms; t5lite then keeps out.
_USER_PLATFORM_CHOICES = ("JAX_PLATFORMS", "JAX_PLATFORM_NAME", "JAX_FORCE_TPU_INIT")


def _jax_hardware_utils():
    """jax._src.hardware_utils (the PCI probes jax itself runs; standard library only), loaded without
    importing jax when jax is not imported yet: `import jax` reads JAX_PLATFORMS once, at import."""
    if "jax" in sys.modules:
        from jax._src import hardware_utils  # noqa: PLC0415

        return hardware_utils
    jax_spec = importlib.util.find_spec("jax")
    if jax_spec is None or not jax_spec.submodule_search_locations:
        return None
    path = os.path.join(list(jax_spec.submodule_search_locations)[0], "_src", "hardware_utils.py")
    spec = importlib.util.spec_from_file_location("t5lite._jax_hardware_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _use_cpu_when_no_accelerator() -> None:
    """JAX on the CPU alone on a machine with libtpu installed (requirements-tpu.txt) but no TPU chip
    and no GPU: there jax would still start libtpu, which prints TPU initialisation errors in every
    process. A machine with a TPU chip or a GPU, or a user's own platform choice, is left as it is."""
    if any(name in os.environ for name in _USER_PLATFORM_CHOICES):
        return
    # (TensorFlow's import sets TPU_LIBRARY_PATH to the libtpu package's library: child processes inherit it.)
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        return
    try:
        hardware = _jax_hardware_utils()
        if hardware is None or hardware.num_available_tpu_chips_and_device_id()[0] > 0:
            return
        if hardware.has_visible_nvidia_gpu() or hardware.num_available_amd_gpus(stop_at=1) > 0:
            return
    except Exception:  # noqa: BLE001  (a probe that fails on some machine must not stop t5lite's import)
        return
    if "jax" not in sys.modules:
        os.environ["JAX_PLATFORMS"] = "cpu"  # read by jax at import; inherited by child processes
        return
    from jax._src import config, xla_bridge  # noqa: PLC0415  (jax was imported before t5lite)

    if config.jax_platforms.value is None and not xla_bridge.backends_are_initialized():
        config.update("jax_platforms", "cpu")


_use_cpu_when_no_accelerator()
