"""ernie-hal: one engine for ERNIE-4.5 text models on CUDA, ROCm, Iluvatar CoreX and CPU.

    import ernie_hal
    ernie_hal.devices()                       # every backend, available or why not
    backend = ernie_hal.pick_device("auto")   # or "rocm", "cuda:1", min_memory=...
    model = ernie_hal.load("path/to/ERNIE-4.5-0.3B-PT", device="auto", dtype="auto")
    model.generate(["Hello"], max_new_tokens=32, temperature=0)
    model.logits(token_ids)                   # float32 [T, vocab]
"""

__version__ = "0.1.0"

from .core.api import Completion, Model, devices, load, pick_device  # noqa: E402
from .core.model.config import ModelConfig, preset  # noqa: E402
from .core.plugins.registry import DeviceError, get_registry  # noqa: E402

__all__ = ["Completion", "DeviceError", "Model", "ModelConfig", "devices", "get_registry", "load",
           "pick_device", "preset"]
