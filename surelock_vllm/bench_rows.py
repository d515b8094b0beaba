"""Locked-row forward vs full-canvas forward at a given model shape (GPU path).

    python -m surelock_vllm.bench_rows --shape llada-8b --device cuda \
        --schedule docs/bench/bench.json --eps 0.005 --gen-lengths 256 512 1024

vLLM cannot be installed on the lent GPU machines, so this measures the
project's torch-level SureLock computation there: the plain-torch LLaDA
(`reference/modeling.py`) with a per-layer K/V cache of the whole canvas,
running each step either on every canvas row (no locking) or on the unlocked
rows only, whose queries attend over the whole cached canvas (SureLock). The
lock schedule (fraction of the canvas locked after each step) is replayed
from a real run of the shipped model (`surelock-bench`'s JSON), rescaled to
the canvas length, so the wall-clock ratio reflects realistic locking.
Random weights (timing does not depend on them). Prints one line per
generation length and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from surelock_vllm.configuration_llada import LLaDAConfig
from surelock_vllm.tools.make_checkpoint import LLADA_VOCAB_SIZE
from surelock_vllm.diffusion.flops import ModelShape

SHAPES = {
    "llada-8b": dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288,
                     vocab_size=126464, embedding_size=126464, max_sequence_length=4096),
    "tiny": dict(d_model=128, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=256,
                 vocab_size=262, embedding_size=262, max_sequence_length=4096),
}


def build_model(shape: str, layers: int | None, device: torch.device, dtype: torch.dtype):
    """A plain-torch LLaDA with random weights at a named shape, optionally with fewer layers."""
    from surelock_vllm.reference.modeling import LLaDAReferenceLM

    values = {**SHAPES[shape], **({"n_layers": layers} if layers else {})}
    if values["vocab_size"] < LLADA_VOCAB_SIZE:  # not LLaDA's vocabulary: its last ids are the special ones
        vocab = values["vocab_size"]
        values.update(mask_token_id=vocab - 1, eos_token_id=vocab - 2, pad_token_id=vocab - 2)
    config = LLaDAConfig(**values)
    torch.manual_seed(0)
    with torch.device(device):
        model = LLaDAReferenceLM(config).to(dtype).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model


def load_schedule(path: Path | None, eps: float) -> list[float]:
    """Locked fraction after each step, from a surelock-bench or surelock-eval report (or a linear ramp)."""
    if path is None:
        return [min(1.0, 0.9 * i / 100) for i in range(100)]
    report = json.loads(Path(path).read_text())
    best = None
    # surelock-bench reports hold cells of runs; surelock-eval reports one list of runs.
    cells = report.get("cells") or [{"gen_length": report["gen_length"], "runs": {r["label"]: r for r in report["runs"]}}]
    for cell in cells:
        for run in cell["runs"].values():
            if run["eps"] is not None and run.get("threshold") is None and abs(run["eps"] - eps) <= 1e-12 and (best is None or cell["gen_length"] > best[0]):
                best = (cell["gen_length"], run["locked_fraction_per_step"])
    if best is None:
        raise SystemExit(f"no run with eps={eps} in {path}")
    return best[1]


def rows_per_step(schedule: list[float], canvas: int, steps: int) -> list[int]:
    """Rows computed at each of `steps` steps of a `canvas`-row request."""
    rows = []
    for t in range(steps):
        if t == 0:
            rows.append(canvas)
            continue
        f = schedule[min(len(schedule) - 1, int((t - 1) / steps * len(schedule)))]
        rows.append(max(1, canvas - int(round(f * canvas))))
    return rows


@torch.no_grad()
def time_steps(model, canvas_ids: torch.Tensor, rows: list[int], sync) -> float:
    """Seconds for a sequence of steps computing `rows[t]` rows each (last rows unlocked)."""
    caches = model.new_kv_caches(canvas_ids.shape[0])
    device = canvas_ids.device
    n = canvas_ids.shape[0]
    model.forward_rows(canvas_ids, torch.arange(n, device=device), caches)  # fill the cache
    sync()
    start = time.perf_counter()
    for r in rows:
        positions = torch.arange(n - r, n, device=device)
        model.forward_rows(canvas_ids[positions], positions, caches)
    sync()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llada-8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--gen-lengths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--schedule", type=Path, default=None, help="surelock-bench or surelock-eval JSON to replay locks from")
    parser.add_argument("--eps", type=float, default=5e-3)
    parser.add_argument("--max-steps", type=int, default=None, help="time only the first N steps (scaled up)")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/gpu_rows.json"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    model = build_model(args.shape, None, device, getattr(torch, args.dtype))
    config = model.config
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    shape = ModelShape.from_config(config)
    schedule = load_schedule(args.schedule, args.eps)
    results = []
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, shape {args.shape}, {args.dtype}, schedule eps={args.eps:g}")
    for gen in args.gen_lengths:
        canvas = args.prompt_length + gen
        ids = torch.randint(0, config.vocab_size, (canvas,), device=device)
        steps = gen
        locked_rows = rows_per_step(schedule, canvas, steps)
        full_rows = [canvas] * steps
        timed = slice(0, args.max_steps)
        scale = steps / len(locked_rows[timed])
        time_steps(model, ids, full_rows[:2], sync)  # warm-up
        t_full = time_steps(model, ids, full_rows[timed], sync) * scale
        t_lock = time_steps(model, ids, locked_rows[timed], sync) * scale
        flops_full = sum(shape.dense_flops(r) + shape.attention_flops(r, canvas) for r in full_rows)
        flops_lock = sum(shape.dense_flops(r) + shape.attention_flops(r, canvas) for r in locked_rows)
        row = {"gen_length": gen, "canvas": canvas, "steps": steps, "full_s": t_full, "surelock_s": t_lock,
               "speedup": t_full / t_lock, "flops_ratio": flops_lock / flops_full,
               "rows_ratio": sum(locked_rows) / sum(full_rows)}
        results.append(row)
        print(f"gen {gen:5d}: full {t_full:8.3f}s  SureLock {t_lock:8.3f}s  speedup {row['speedup']:.2f}x  "
              f"FLOPs ratio {row['flops_ratio']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": name, "shape": args.shape, "dtype": args.dtype, "eps": args.eps,
                                    "command": " ".join(sys.argv), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
