"""Training throughput: a plain fp32 PyTorch loop vs liverus's default training step, in one run.

Prints, for CustomModel and the ResNet-50 baseline at the given size and batch: images/s of both loops and their
ratio, peak memory, and the achieved FLOP/s as a fraction of this machine's matmul peak (measured here with a large
``torch.matmul``, in bf16 and in fp32). liverus's default step is what ``runtime.precision=auto`` and
``runtime.channels_last=auto`` resolve to on this machine; ``--variants`` also times the alternatives.

    python benchmarks/train_throughput.py                 # 224 px, batch 32 (the README figures)
    python benchmarks/train_throughput.py --size 128 --batch 16 --steps 3   # quicker
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F

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


def train_flops_per_image(model: torch.nn.Module, size: int) -> float:
    """FLOPs of forward + backward for one image, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 1, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


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
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    return step


def measure(step, batch: int, size: int, steps: int, warmup: int) -> float:
    x = torch.randint(0, 255, (batch, 1, size, size), dtype=torch.uint8)
    y = torch.randint(0, 2, (batch,))
    for _ in range(warmup):
        step(x, y)
    t = time.perf_counter()
    for _ in range(steps):
        step(x, y)
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
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    cpu = torch.device("cpu")
    amp = resolve_precision("auto", cpu)
    cl = resolve_channels_last("auto", cpu, amp)
    native_bf16 = amp is not None
    peak_bf16 = matmul_peak(torch.bfloat16, n=4096 if native_bf16 else 512, reps=3 if native_bf16 else 1)
    peak_fp32 = matmul_peak(torch.float32)
    peak = peak_bf16 if native_bf16 else peak_fp32
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
