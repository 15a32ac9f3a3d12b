"""Loading the model a command or a service should use: a saved checkpoint (folder or Hub id), or the embedded default,
on the device and in the precision asked for."""

import torch

from .modeling_crosstvr import CrossTVRModel
from .processing_crosstvr import CrossTVRProcessor


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """
    The device to run on. None or "auto": the one accelerate assigns this process — `cuda:<local rank>` under
    `accelerate launch` / torchrun on GPUs, the GPU on a one-GPU machine, else the CPU (and the CPU whenever
    `ACCELERATE_USE_CPU` is set). Anything else is taken as named, after checking that it exists.
    """
    if device is None or device == "auto":
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: no CUDA device is available here; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype given by name ("float32", "bfloat16", "float16") or as a `torch.dtype`; None keeps the checkpoint's."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(
    model_name_or_path: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[CrossTVRModel, CrossTVRProcessor]:
    """
    A saved CrossTVR checkpoint (local folder or Hub id) with its processor, or the embedded default when None; in
    eval mode, on `device` (see `resolve_device`). With `dtype` bfloat16 or float16 the towers run in that precision
    and stage 2 stays in float32 (see `CrossTVRModel._keep_in_fp32_modules_strict`).
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if model_name_or_path is None:
        from .default_model import load_default_model

        model, processor = load_default_model(dtype=dtype)
    else:
        from transformers import AutoModel, AutoProcessor

        model = AutoModel.from_pretrained(model_name_or_path, dtype=dtype)
        processor = AutoProcessor.from_pretrained(model_name_or_path)
    return model.to(device).eval(), processor
