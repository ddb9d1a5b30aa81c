"""Where and in what precision tensors run: device, autocast dtype and memory format, resolved from ``auto``."""

from __future__ import annotations

import torch

__all__ = [
    "PRECISIONS",
    "CHANNELS_LAST_SETTINGS",
    "cpu_bf16_supported",
    "resolve_device",
    "resolve_precision",
    "resolve_channels_last",
    "precision_name",
    "inference_amp",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHANNELS_LAST_SETTINGS = ("auto", "true", "false")


def cpu_bf16_supported() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 BF16 or AMX) rather than emulating it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto``: the local GPU when there is one, else the CPU. Under DDP on CUDA each rank takes ``local_rank``.

    Raises:
        RuntimeError: when CUDA is asked for and there is no GPU.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device asks for CUDA but no GPU is available")
    return dev


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or ``None`` for fp32.

    ``auto`` picks bf16 on a CPU with native bf16 (AVX-512 BF16 / AMX) and on GPUs that support it, fp16 on older
    GPUs, and fp32 elsewhere. Weights, optimiser state and the loss stay fp32 in every case.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_bf16_supported() else None


def resolve_channels_last(setting: str, device: torch.device, amp: torch.dtype | None) -> bool:
    """``auto``: channels-last on CUDA and with CPU bf16 (oneDNN's fast path); on an fp32-only CPU the NCHW
    kernels were measured faster (benchmarks/train_throughput.py)."""
    if setting not in CHANNELS_LAST_SETTINGS:
        raise ValueError(f"channels_last must be one of {CHANNELS_LAST_SETTINGS}, got {setting!r}")
    if setting != "auto":
        return setting == "true"
    return device.type == "cuda" or amp is not None


def inference_amp(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for serving a model whose card says ``precision``: bf16 where the card validated it and the
    device runs it natively; fp32 otherwise (the card only says bf16 where it moved probabilities by < 0.005)."""
    if precision == "bf16" and (device.type == "cuda" or cpu_bf16_supported()):
        return torch.bfloat16
    return None


def precision_name(amp: torch.dtype | None) -> str:
    """``fp32``, ``bf16`` or ``fp16`` (what a model card records)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
