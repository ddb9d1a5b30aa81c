"""Training throughput: a plain fp32 PyTorch loop vs liverus's default training step, in one run.

Prints, for CustomModel and the ResNet-50 baseline at the given size and batch: images/s of both loops and their
ratio, peak memory, and the achieved FLOP/s as a fraction of this machine's matmul peak (measured here with a large
``torch.matmul``, in bf16 and in fp32). liverus's default step is what ``runtime.precision=auto`` and
``runtime.channels_last=auto`` resolve to on this machine; ``--variants`` also times the alternatives.

A roofline in words: a large matmul is the best case for the CPU's matrix units (AMX tiles, AVX-512 BF16), but a
convolution network cannot reach it when its convolutions run slower than the matmul. So the script also times the
model's own convolutions alone (every Conv2d of one forward, with its backward, at the step's precision and memory
layout, each distinct shape timed once and weighted by how often it occurs) and reports which bound the step hits:
the convolution bound (the step runs near what its convolutions alone allow) or overhead (normalisation,
activations, attention, optimiser).

    python benchmarks/train_throughput.py                 # 224 px, batch 32 (the README figures)
    python benchmarks/train_throughput.py --size 128 --batch 16 --steps 3   # quicker
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402
from liverus.engine.forward import model_input
from liverus.engine.runtime import resolve_channels_last, resolve_precision
from liverus.models import build_model, default_card


def matmul_peak(dtype: torch.dtype, n: int = 4096, reps: int = 5) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def conv_shapes(model: torch.nn.Module, batch: int, size: int) -> Counter:
    """Every Conv2d call of one forward at this batch and size: (input shape, conv settings) -> count."""
    shapes: Counter = Counter()

    def hook(m, inputs, _out):
        pad = m.padding if isinstance(m.padding, str) else tuple(m.padding)  # some libraries store lists
        key = (tuple(inputs[0].shape), m.out_channels, tuple(m.kernel_size), tuple(m.stride), pad, tuple(m.dilation))
        shapes[(*key, m.groups)] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(batch, 1, size, size))
    finally:
        for h in handles:
            h.remove()
    return shapes


def conv_roofline(shapes: Counter, amp: torch.dtype | None, channels_last: bool, reps: int = 2) -> dict:
    """Time forward + backward of the model's convolutions alone, as the training step runs them (autocast to
    ``amp``, ``channels_last``). Returns: seconds per batch, FLOPs per batch and the achieved FLOP/s."""
    total_s = total_flops = 0.0
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for (shape, cout, k, stride, pad, dil, groups), count in shapes.items():
        conv = torch.nn.Conv2d(shape[1], cout, k, stride, pad, dil, groups, bias=False)
        conv = conv.to(memory_format=fmt)
        x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_(True)
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            y = conv(x)
        out_elems = y.numel()
        flops = 2 * out_elems * (shape[1] // groups) * k[0] * k[1] * 3  # forward + grad input + grad weight
        g = torch.ones_like(y)
        best = float("inf")
        for _ in range(reps + 1):  # the first is warm-up
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                y = conv(x)
            y.backward(g)
            best = min(best, time.perf_counter() - t) if _ else best
            x.grad = None
            conv.weight.grad = None
        total_s += best * count
        total_flops += flops * count
    return {"seconds_per_batch": total_s, "flops_per_batch": total_flops, "flop_s": total_flops / total_s}


def train_flops_per_image(model: torch.nn.Module, size: int) -> float:
    """FLOPs of forward + backward for one image: the forward counted by torch's FlopCounterMode, the backward taken
    as twice the forward (the usual convention; FlopCounterMode's own backward count multiplies the depthwise
    convolutions of EfficientNet by their channel count, about twenty times too many)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 1, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    model.train()
    return 3 * counter.get_total_flops() / 2


def plain_step_fn(model, opt):
    def step(x_u8, y):
        x = (x_u8.float() / 255 - 0.449) / 0.226
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def liverus_step_fn(model, opt, amp, channels_last):
    """The trainer's step: uint8 -> normalise on device, autocast, fp32 loss, gradient clipping, optimiser."""

    card = default_card(model)

    def step(x_u8, y):
        x = model_input(x_u8, card, channels_last=channels_last)
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    return step


def measure(step, batch: int, size: int, steps: int, warmup: int, device: str = "cpu") -> float:
    """Images per second of ``step`` on one fixed batch (already on ``device``: the data loader is not timed)."""
    x = torch.randint(0, 255, (batch, 1, size, size), dtype=torch.uint8, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)  # CUDA runs asynchronously: wait before timing
    for _ in range(warmup):
        step(x, y)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    sync()
    return batch * steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=["custom_resnet50", "baseline_resnet50"])
    ap.add_argument(
        "--variants",
        nargs="*",
        default=[],
        choices=["fp32_channels_last", "bf16", "bf16_channels_last"],
        help="also time these alternatives to the default step",
    )
    ap.add_argument("--no-roofline", action="store_true", help="skip timing the model's convolutions alone")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    cpu = torch.device("cpu")
    amp = resolve_precision("auto", cpu)
    cl = resolve_channels_last("auto", cpu, amp)
    native_bf16 = amp is not None
    peak_bf16 = matmul_peak(torch.bfloat16, n=4096 if native_bf16 else 512, reps=3 if native_bf16 else 1)
    peak_fp32 = matmul_peak(torch.float32)
    peak = peak_bf16 if native_bf16 else peak_fp32
    print(f"CPU: {cpu_name()}")
    print(
        f"torch {torch.__version__}  threads {torch.get_num_threads()}  cpu capability "
        f"{torch.backends.cpu.get_cpu_capability()}  native bf16: {native_bf16}"
    )
    print(f"matmul peak: bf16 {peak_bf16 / 1e9:.1f} GFLOP/s, fp32 {peak_fp32 / 1e9:.1f} GFLOP/s")
    print(f"liverus default step here: precision {amp or 'fp32'}, channels_last {cl}")
    rows = []
    variants = {
        "fp32_channels_last": (None, True),
        "bf16": (torch.bfloat16, False),
        "bf16_channels_last": (torch.bfloat16, True),
    }
    for name in args.models:
        torch.manual_seed(0)
        flops = train_flops_per_image(build_model(name), args.size)
        plain_model = build_model(name).train()
        plain = measure(
            plain_step_fn(plain_model, torch.optim.AdamW(plain_model.parameters(), 1e-4)),
            args.batch,
            args.size,
            args.steps,
            args.warmup,
        )
        del plain_model
        fast_model = build_model(name).train()
        if cl:
            fast_model = fast_model.to(memory_format=torch.channels_last)
        fast = measure(
            liverus_step_fn(fast_model, torch.optim.AdamW(fast_model.parameters(), 1e-4), amp, cl),
            args.batch,
            args.size,
            args.steps,
            args.warmup,
        )
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        achieved = fast * flops
        row = {
            "model": name,
            "size": args.size,
            "batch": args.batch,
            "plain_fp32_img_s": round(plain, 2),
            "liverus_img_s": round(fast, 2),
            "speedup": round(fast / plain, 2),
            "train_gflop_per_image": round(flops / 1e9, 2),
            "achieved_gflop_s": round(achieved / 1e9, 1),
            "fraction_of_matmul_peak": round(achieved / peak, 3),
            "fraction_of_bf16_matmul_peak": round(achieved / peak_bf16, 3),
            "peak_rss_gib": round(rss / 2**20, 2),
        }
        print(
            f"{name:20s} plain fp32 {plain:6.2f} img/s | liverus {fast:6.2f} img/s | x{fast / plain:4.2f} | "
            f"{achieved / 1e9:6.1f} GFLOP/s = {achieved / peak:5.1%} of the {'bf16' if native_bf16 else 'fp32'} "
            f"matmul peak ({achieved / peak_bf16:.1%} of bf16) | peak RSS {row['peak_rss_gib']} GiB"
        )
        if not args.no_roofline:
            roof = conv_roofline(conv_shapes(build_model(name), args.batch, args.size), amp, cl)
            conv_bound = args.batch / roof["seconds_per_batch"]
            row["conv_gflop_s"] = round(roof["flop_s"] / 1e9, 1)
            row["conv_fraction_of_matmul_peak"] = round(roof["flop_s"] / peak, 3)
            row["conv_bound_img_s"] = round(conv_bound, 2)
            row["fraction_of_conv_bound"] = round(fast / conv_bound, 3)
            bound = "the convolution bound" if fast >= 0.7 * conv_bound else "overhead outside the convolutions"
            print(
                f"{'':20s} roofline: its convolutions alone (fwd+bwd, same precision and layout) run at "
                f"{roof['flop_s'] / 1e9:.1f} GFLOP/s = {roof['flop_s'] / peak:.0%} of the matmul peak, i.e. at most "
                f"{conv_bound:.2f} img/s; the step reaches {fast / conv_bound:.0%} of that: it is limited by {bound}"
            )
        for v in args.variants:
            dt, vcl = variants[v]
            m = build_model(name).train()
            if vcl:
                m = m.to(memory_format=torch.channels_last)
            ips = measure(
                liverus_step_fn(m, torch.optim.AdamW(m.parameters(), 1e-4), dt, vcl),
                args.batch,
                args.size,
                max(1, args.steps // 2),
                1,
            )
            row[f"{v}_img_s"] = round(ips, 2)
            print(f"{'':20s} variant {v}: {ips:6.2f} img/s (x{ips / plain:4.2f} of plain)")
        rows.append(row)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "matmul_peak_bf16_gflop_s": peak_bf16 / 1e9,
                    "matmul_peak_fp32_gflop_s": peak_fp32 / 1e9,
                    "native_bf16": native_bf16,
                    "rows": rows,
                },
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
