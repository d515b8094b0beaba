"""Quality vs compute of SureLock on the shipped trained model, through the vLLM plugin.

    surelock-eval                                   # table, JSON and plots in docs/eval/
    surelock-eval --eps 5e-4 5e-3 --per-task 20     # a quicker look

One engine. The held-out problems (`surelock_vllm.tasks`, never seen in
training) run as one batch with the no-lock sampler, then with SureLock at
each eps, in one run. For each run: exact-match accuracy per task, agreement
with the no-lock output (identical completion text), algorithmic FLOPs and
rows computed relative to no-lock (by formula, from the engine's per-request
accounting), and wall-clock relative to no-lock (medians of `--repeats`
alternating runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from surelock_vllm.tasks import TASKS, heldout_problems, is_correct

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "llada-small"
DEFAULT_EPS = [5e-4, 1e-3, 5e-3, 5e-2, 0.5, 2.0, 10.0]


def run_config(llm, conversations, params):
    from surelock_vllm.stats import surelock_stats

    t0 = time.perf_counter()
    outs = llm.chat(conversations, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    return wall, [o.outputs[0].text for o in outs], [surelock_stats(o) for o in outs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--eps", type=float, nargs="+", default=DEFAULT_EPS)
    parser.add_argument("--confidence-gate", type=float, default=None,
                        help="also require this confidence before locking (surelock_confidence_gate)")
    parser.add_argument("--per-task", type=int, default=50, help="held-out problems per task (at most 50)")
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=Path("docs/eval"))
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if Path(args.model) == DEFAULT_MODEL and not (DEFAULT_MODEL / "config.json").exists():
        parser.error(f"--model: no trained checkpoint at {DEFAULT_MODEL}; train one with `make train` "
                     "(surelock_vllm/tools/train_small.py) or pass --model")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")

    from tqdm import tqdm
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    from surelock_vllm.bench import aggregate, describe_device

    problems = _first_per_task(heldout_problems(), args.per_task)
    conversations = [[{"role": "user", "content": p.prompt}] for p in problems]
    extra = {"gpu_memory_utilization": 0.3} if current_platform.is_cpu() else {}
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=1024, block_size=32, enforce_eager=True,
              max_num_seqs=len(problems), max_num_batched_tokens=32768, seed=0, **extra)

    def params(eps: float | None):
        diffusion = {"gen_length": args.gen_length, "steps": args.steps, "block_length": args.block_length}
        if eps is None:
            diffusion["surelock"] = False
        else:
            diffusion.update(surelock=True, surelock_eps=eps)
            if args.confidence_gate is not None:
                diffusion["surelock_confidence_gate"] = args.confidence_gate
        return SamplingParams(max_tokens=args.gen_length, temperature=0.0, extra_args=diffusion)

    configs: list[float | None] = [None, *args.eps]
    walls: dict[float | None, list[float]] = {c: [] for c in configs}
    texts: dict[float | None, list[str]] = {}
    stats: dict[float | None, list[dict]] = {}
    try:
        run_config(llm, conversations[:2], params(None))  # warm-up
        with tqdm(total=len(configs) * args.repeats, desc="evaluate", unit="run") as bar:
            for r in range(args.repeats):
                for c in configs if r % 2 == 0 else list(reversed(configs)):
                    wall, texts[c], stats[c] = run_config(llm, conversations, params(c))
                    walls[c].append(wall)
                    bar.update()
    finally:
        llm.llm_engine.engine_core.shutdown()  # stop the engine processes now

    nolock_wall = statistics.median(walls[None])
    report = {
        "command": "surelock-eval " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model, "dtype": args.dtype, "device": describe_device(),
        "gen_length": args.gen_length, "steps": args.steps, "block_length": args.block_length,
        "confidence_gate": args.confidence_gate, "problems": len(problems), "runs": [],
    }
    for c in configs:
        correct = [is_correct(p, t) for p, t in zip(problems, texts[c])]
        per_task = {task: _mean([ok for p, ok in zip(problems, correct) if p.task == task]) for task in sorted(TASKS)}
        agg = aggregate(stats[c])
        report["runs"].append({
            "label": "no-lock" if c is None else f"eps={c:g}", "eps": c,
            "accuracy": _mean(correct), "accuracy_per_task": per_task,
            "agreement_with_nolock": _mean([a == b for a, b in zip(texts[c], texts[None])]),
            "flops_ratio": agg["flops_ratio"], "dense_ratio": agg["dense_ratio"],
            "attention_ratio": agg["attention_ratio"], "rows": agg["rows"], "rows_nolock": agg["rows_nolock"],
            "rows_ratio": agg["rows_ratio"], "locked_fraction_per_step": agg["locked_fraction_per_step"],
            "wall_s": walls[c], "wall_ratio": statistics.median(walls[c]) / nolock_wall,
            "examples": [{"task": p.task, "prompt": p.prompt, "answer": p.answer, "output": t}
                         for p, t in list(zip(problems, texts[c]))[:: max(1, len(problems) // 12)]],
        })

    print("\n" + markdown_table(report))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out_dir / "eval.md").write_text(markdown_report(report))
    print(f"\nwrote {args.out_dir / 'eval.json'} and {args.out_dir / 'eval.md'}")
    if not args.no_plots:
        for path in plot_eval(report, args.out_dir):
            print(f"wrote {path}")
    return 0


def _first_per_task(problems, per_task: int):
    counts: dict[str, int] = {}
    chosen = []
    for p in problems:
        if counts.get(p.task, 0) < per_task:
            counts[p.task] = counts.get(p.task, 0) + 1
            chosen.append(p)
    return chosen


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def markdown_table(report: dict) -> str:
    tasks = sorted(TASKS)
    head = ["run", "exact match", *tasks, "agree w/ no-lock", "FLOPs saved", "dense", "attn", "rows computed", "wall-clock"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in report["runs"]:
        lines.append("| " + " | ".join([
            run["label"], f"{run['accuracy']:.1%}", *(f"{run['accuracy_per_task'][t]:.0%}" for t in tasks),
            f"{run['agreement_with_nolock']:.1%}", f"{1 - run['flops_ratio']:.1%}", f"{run['dense_ratio']:.3f}",
            f"{run['attention_ratio']:.3f}", f"{run['rows']} ({run['rows_ratio']:.3f})", f"{run['wall_ratio']:.2f}x",
        ]) + " |")
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    nolock = report["runs"][0]
    gate = report["confidence_gate"]
    out = [
        "# SureLock quality vs compute (shipped trained model)",
        "",
        f"Command: `{report['command']}`  ",
        f"Model: `{Path(report['model']).name}` ({report['dtype']}); device: {report['device']}.  ",
        f"{report['problems']} held-out problems (never in training), greedy, low-confidence remasking, "
        f"gen_length {report['gen_length']}, steps {report['steps']}, block_length {report['block_length']}"
        + (f", confidence gate {gate}" if gate is not None else "") + ".",
        "",
        "`FLOPs saved` is algorithmic (by formula, dense + attention, LM head excluded) relative to the",
        "same sampler without locking; `dense`/`attn` are the ratios of each part; `rows computed` is",
        "the number of query rows the model ran (and its ratio to no-lock); `wall-clock` is the median",
        "run time relative to no-lock in the same run. `agree w/ no-lock`: identical completion text.",
        "",
        markdown_table(report),
        "",
        "![step-wise FLOPs ratio](stepwise_flops_ratio.png)",
        "![accuracy vs FLOPs saved](accuracy_vs_flops.png)",
        "",
        "## Sample outputs (no-lock)",
        "",
        "| task | prompt | answer | output |",
        "|---|---|---|---|",
    ]
    for ex in nolock["examples"]:
        out.append(f"| {ex['task']} | `{ex['prompt']}` | `{ex['answer']}` | `{ex['output']}` |")
    return "\n".join(out) + "\n"


def plot_eval(report: dict, out: Path) -> list[Path]:
    from surelock_vllm.bench_plots import _plt

    plt = _plt()
    runs = [r for r in report["runs"] if r["eps"] is not None]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in runs:
        locked = r["locked_fraction_per_step"]
        ratio = [1.0] + [1.0 - f for f in locked[:-1]]
        ax.plot([i / report["steps"] for i in range(len(ratio))], ratio, label=r["label"])
    ax.set_xlabel("denoising progress (step / steps)")
    ax.set_ylabel("FLOPs vs no-lock, per step")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Step-wise FLOPs ratio (trained model, held-out set)")
    fig.tight_layout()
    stepwise = out / "stepwise_flops_ratio.png"
    fig.savefig(stepwise, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    nolock = report["runs"][0]
    ax.axhline(nolock["accuracy"] * 100, color="gray", lw=0.8, ls="--", label="no-lock")
    xs = [(1 - r["flops_ratio"]) * 100 for r in runs]
    ax.plot(xs, [r["accuracy"] * 100 for r in runs], marker="o", label="SureLock")
    for r, x in zip(runs, xs):
        ax.annotate(r["label"].removeprefix("eps="), (x, r["accuracy"] * 100), textcoords="offset points",
                    xytext=(4, -10), fontsize=8)
    ax.set_xlabel("algorithmic FLOPs saved (%)")
    ax.set_ylabel("exact match (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Accuracy vs compute saved (labels: eps)")
    fig.tight_layout()
    acc = out / "accuracy_vs_flops.png"
    fig.savefig(acc, dpi=120)
    plt.close(fig)
    return [stepwise, acc]


if __name__ == "__main__":
    sys.exit(main())
