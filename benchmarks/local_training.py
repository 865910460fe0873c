"""Tokens/s of a leaf's local training in worldlm against a plain PyTorch loop, in one process.

The variants train the same model class on the same random blocks with the same batch size
and step count, each on its own copy of the same initial model, interleaved repetition by
repetition after a warm-up:

- `worldlm leaf`: `Leaf.handle_train(TrainTask)`, the path a leaf takes in a round (load the
  incoming state, build AdamW and restore its moments, the local loop, copy the new state out);
- `worldlm local_train`: only `local_train` with an optimizer made once, i.e. the loop itself;
- `plain PyTorch`: a hand-written AdamW loop with gradient clipping;
- with `--control`, a second plain loop: how far it lands from the first is the noise floor.

    python benchmarks/local_training.py --preset small --reps 10 --control --json bench.json

Results and how to read them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import transformers
from rich.console import Console
from rich.table import Table

from machine_info import load_average, machine_info
from worldlm.config import EvalConfig, ModelConfig, TrainConfig
from worldlm.core.leaf_data import LeafData
from worldlm.core.messages import State, TrainTask
from worldlm.core.state import get_state, set_state
from worldlm.federation.context import RunContext
from worldlm.federation.leaf import Leaf
from worldlm.model.build import build_model, count_parameters
from worldlm.presets import PRESETS
from worldlm.seeding import generator
from worldlm.train.device import pick_device
from worldlm.train.local import local_train, make_optimizer

LEAF, LOOP, PLAIN = "worldlm leaf", "worldlm local_train", "plain PyTorch"
CONTROL = "plain PyTorch, 2nd copy"
Runner = Callable[[], object]
# Dense bf16 peak TFLOP/s by device name (vendor datasheets, without sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100": 756.0,  # unknown form factor: the lower figure, so MFU is not overstated
    "A100": 312.0,
    "L40S": 362.1,
    "L40": 181.0,
    "L4": 121.0,  # after the L40s: "L4" is a prefix of their names
    "A10": 125.0,
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--preset", default="small", help="model size preset (tiny, mini, small, ...)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size")
    p.add_argument("--block-size", type=int, default=128, help="tokens per block")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per step")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per repetition")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions per variant first")
    p.add_argument("--blocks", type=int, default=256, help="training blocks the leaf holds")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--control",
        action="store_true",
        help="add a second, identical plain loop: its ratio shows the noise floor",
    )
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA if present"
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile both loops (train.compile)"
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak dense TFLOP/s for MFU (default: known GPUs' bf16 peak; none "
        "on CPU, where MFU is not reported)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    for name in ("vocab", "block_size", "batch_size", "steps", "reps", "blocks"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def flops_per_token(params: int, layers: int, hidden: int, block: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward and backward) plus attention's
    12 * layers * hidden * block (Chowdhery et al. 2022, appendix B; nanoGPT's estimate)."""
    return 6.0 * params + 12.0 * layers * hidden * block


def peak_flops(device: torch.device, given_tflops: float | None) -> float | None:
    """The device's peak FLOP/s: given, or a known GPU's bf16 peak; None if unknown."""
    if given_tflops is not None:
        return given_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():  # most specific names first
        if key in name:
            return tflops * 1e12
    return None


def plain_loop(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    blocks: torch.Tensor,  # (N, T)
    *,
    batch_size: int,
    steps: int,
    grad_clip: float,
    gen: torch.Generator,
) -> None:
    """The reference: the loop one would write by hand, with no federation around it (no
    schedule, and weight decay on every parameter); bf16 autocast on CUDA, as nanoGPT."""
    model.train()
    device = next(model.parameters()).device
    for _ in range(steps):
        rows = torch.randint(blocks.shape[0], (batch_size,), generator=gen)
        x = blocks[rows].to(device, non_blocking=True)  # (B, T)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def plain_runner(
    model: torch.nn.Module, blocks: torch.Tensor, cfg: TrainConfig, gen: torch.Generator
) -> Runner:
    cuda = next(model.parameters()).is_cuda
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay,
        fused=cuda,
    )
    trained = cast(torch.nn.Module, torch.compile(model)) if cfg.compile else model
    return lambda: plain_loop(
        trained,
        optimizer,
        blocks,
        batch_size=cfg.batch_size,
        steps=cfg.local_steps,
        grad_clip=cfg.grad_clip,
        gen=gen,
    )


def on_device(
    model_cfg: ModelConfig, args: argparse.Namespace, device: torch.device
) -> torch.nn.Module:
    """A fresh copy of the benchmark's model (same seed, same weights) on `device`."""
    return build_model(model_cfg, args.vocab, seed=args.seed).to(device)  # type: ignore[arg-type]


def make_variants(
    args: argparse.Namespace, blocks: torch.Tensor, device: torch.device
) -> tuple[dict[str, Runner], Leaf, State]:
    """One runner per variant; also the leaf and the state its parent sends, for the overhead
    breakdown."""
    model_cfg = ModelConfig(preset=args.preset, block_size=args.block_size)
    cfg = TrainConfig(local_steps=args.steps, batch_size=args.batch_size, compile=args.compile)
    horizon = 100 * args.steps * (args.reps + args.warmup)  # keeps the schedule off its floor
    leaf_model, loop_model = (on_device(model_cfg, args, device) for _ in range(2))

    leaf = Leaf(
        "root/leaf",
        LeafData("leaf", blocks, {}),
        workspace=leaf_model,
        train_cfg=cfg,
        eval_cfg=EvalConfig(),
        total_steps=horizon,
        personal_keys=frozenset(),
        ctx=RunContext(run_id="bench", seed=args.seed, device=device),
    )
    incoming = get_state(leaf_model)  # the same parent state every round

    def run_leaf() -> object:
        r = leaf.sessions
        return leaf.handle_train(TrainTask("bench", r, r, "root", leaf.path, f"n{r}", incoming))

    loop_opt = make_optimizer(loop_model, cfg)
    loop_trained = cast(torch.nn.Module, torch.compile(loop_model)) if args.compile else loop_model
    loop_sessions = [0]

    def run_local_train() -> object:
        s = loop_sessions[0]
        loop_sessions[0] += 1
        return local_train(
            loop_trained,
            loop_opt,
            blocks,
            cfg,
            start_step=s * args.steps,
            total_steps=horizon,
            gen=generator(args.seed, "loop", s),
            device=device,
        )

    variants: dict[str, Runner] = {LEAF: run_leaf, LOOP: run_local_train}
    for name in (PLAIN, CONTROL) if args.control else (PLAIN,):
        model = on_device(model_cfg, args, device)
        variants[name] = plain_runner(model, blocks, cfg, generator(args.seed, name))
    return variants, leaf, incoming


def timed(fn: Runner) -> float:
    gc.collect()  # outside the clock, so that a collection never lands inside one variant only
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if cuda:  # the GPU's queued work belongs to this variant's time
        torch.cuda.synchronize()
    return time.perf_counter() - started


def interleaved(variants: dict[str, Runner], reps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per repetition of each variant. All variants run once per repetition; the order
    rotates so that no variant always follows the same neighbour."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            seconds[name].append(timed(variants[name]))
    return seconds


def overhead_parts(leaf: Leaf, incoming: State, reps: int) -> dict[str, list[float]]:
    """Seconds of each per-round step that `Leaf.handle_train` adds around `local_train`."""
    model, cfg = leaf.workspace, leaf.train_cfg
    saved = leaf.optimizer_state
    assert saved is not None, "run the leaf at least once first"
    restored = make_optimizer(model, cfg)
    restored.load_state_dict(saved)
    parts: dict[str, Runner] = {
        "set_state (state in)": lambda: set_state(model, leaf.deployed_state(incoming)),
        "make_optimizer": lambda: make_optimizer(model, cfg),
        "optimizer.load_state_dict": lambda: restored.load_state_dict(saved),
        "optimizer.state_dict": restored.state_dict,
        "get_state (state out)": lambda: get_state(model),
    }
    return {name: [timed(fn) for _ in range(reps)] for name, fn in parts.items()}


def machine(args: argparse.Namespace, params: int) -> dict[str, Any]:
    return machine_info(args, transformers=transformers.__version__, parameters=params)


def summarize(
    seconds: dict[str, list[float]], tokens: int, flops_token: float, peak: float | None
) -> dict[str, dict[str, float | None]]:
    best_plain, median_plain = min(seconds[PLAIN]), statistics.median(seconds[PLAIN])
    rows: dict[str, dict[str, float | None]] = {}
    for name, xs in seconds.items():
        best, median = min(xs), statistics.median(xs)
        rows[name] = {
            # model FLOPs utilization at the best repetition: achieved FLOP/s over the peak
            "mfu_best": None if peak is None else tokens / best * flops_token / peak,
            "min_s": best,
            "median_s": median,
            "tokens_per_s_best": tokens / best,
            "tokens_per_s_median": tokens / median,
            # worldlm/plain in tokens/s, i.e. plain seconds over this variant's seconds
            "ratio_min": best_plain / best,
            "ratio_median": median_plain / median,
        }
    return rows


def print_results(
    console: Console,
    info: dict[str, Any],
    rows: dict[str, dict[str, float | None]],
    parts: dict[str, list[float]],
    tokens: int,
) -> None:
    s = info["settings"]
    console.print(
        f"[bold]machine[/]: {info['processor']}, {info['cpu_count']} CPUs "
        f"({info['cpus_usable']} usable), torch {info['torch']} with {info['torch_threads']} "
        f"threads, transformers {info['transformers']}, Python {info['python']}; load average "
        f"{info['load_before']} before, {info['load_after']} after"
    )
    console.print(
        f"[bold]workload[/]: preset {s['preset']} ({info['parameters']:,} parameters), vocab "
        f"{s['vocab']}, block {s['block_size']}, batch {s['batch_size']}, {s['steps']} steps = "
        f"{tokens:,} tokens per repetition; {s['warmup']} warm-up + {s['reps']} timed reps"
    )
    table = Table(
        title="Local training, seconds per repetition (interleaved)",
        caption="ratio = tokens/s of the variant / tokens/s of plain PyTorch",
    )
    table.add_column("variant", no_wrap=True)
    for col in ("min s", "median s", "tokens/s best", "MFU best", "ratio min", "ratio median"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        mfu = r["mfu_best"]
        table.add_row(
            name,
            f"{r['min_s']:.3f}",
            f"{r['median_s']:.3f}",
            f"{r['tokens_per_s_best']:,.0f}",
            "n/a" if mfu is None else f"{100 * mfu:.1f}%",
            f"{r['ratio_min']:.3f}",
            f"{r['ratio_median']:.3f}",
        )
    console.print(table)
    extra = Table(title="Per-round steps of Leaf.handle_train around local_train (ms)")
    extra.add_column("step", no_wrap=True)
    extra.add_column("min ms", justify="right")
    extra.add_column("median ms", justify="right")
    for name, xs in parts.items():
        extra.add_row(name, f"{1e3 * min(xs):.2f}", f"{1e3 * statistics.median(xs):.2f}")
    total = [sum(xs) for xs in zip(*parts.values(), strict=True)]
    extra.add_row(
        "sum of the steps", f"{1e3 * min(total):.2f}", f"{1e3 * statistics.median(total):.2f}"
    )
    gap_min = float(rows[LEAF]["min_s"] or 0) - float(rows[LOOP]["min_s"] or 0)
    gap_median = float(rows[LEAF]["median_s"] or 0) - float(rows[LOOP]["median_s"] or 0)
    extra.add_row(
        "leaf - local_train (from the table above)",
        f"{1e3 * gap_min:.1f}",
        f"{1e3 * gap_median:.1f}",
    )
    console.print(extra)


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)  # TF32 on for CUDA, as in a run
    blocks = torch.randint(args.vocab, (args.blocks, args.block_size))  # (N, T) token ids
    variants, leaf, incoming = make_variants(args, blocks, device)
    tokens = args.steps * args.batch_size * args.block_size
    params = count_parameters(leaf.workspace)
    info = machine(args, params)
    preset = PRESETS[args.preset]
    flops_token = flops_per_token(params, preset.layers, preset.hidden, args.block_size)
    peak = peak_flops(device, args.peak_tflops)
    info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    info["flops_per_token"] = flops_token
    info["peak_flops"] = peak

    seconds = interleaved(variants, args.reps, args.warmup)
    parts = overhead_parts(leaf, incoming, reps=max(10, args.reps))
    info["load_after"] = load_average()
    rows = summarize(seconds, tokens, flops_token, peak)
    print_results(Console(), info, rows, parts, tokens)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {**info, "tokens_per_rep": tokens, "variants": rows, "seconds": seconds}
        result["overhead_parts_s"] = parts
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
