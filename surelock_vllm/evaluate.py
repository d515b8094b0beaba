"""Quality vs compute of SureLock on the shipped trained models, through the vLLM plugin.

    surelock-eval                                   # tables, JSON and plots in docs/eval/
    surelock-eval --eps 5e-4 5e-3 --per-task 20     # a quicker look
    surelock-eval --suite count --out-dir docs/eval-long   # the long-answer model at gen_length 256

`--suite short` (default) evaluates `checkpoints/llada-small` on its short
tasks at gen_length 32; `--suite count` evaluates `checkpoints/llada-long`
(`make train-long`) on answers of 99-239 tokens at gen_length 256, block 32,
steps 256 (the SureLock paper's length), unless `--model` / `--gen-length` /
... say otherwise. `--suite passages` has the same canvas and no shipped
model (no recipe here learns it; pass `--model`).

One engine. The held-out problems (`surelock_vllm.tasks`, never seen in
training) run as one batch with the no-lock sampler, then with SureLock at
each eps, then the fewer-steps grid: confidence-threshold decoding
(Fast-dLLM's parallel decoding) at each `--thresholds` value, with SureLock
off and on at `--grid-eps`; all in one run. For each run: exact-match
accuracy per task, agreement with the no-lock output (identical completion
text), steps taken, algorithmic FLOPs and rows computed (by formula, from the
engine's per-request accounting), and wall-clock relative to fixed-step
no-lock decoding (medians of `--repeats` alternating runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from surelock_vllm.tasks import SUITES, heldout_problems, is_correct

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
DEFAULT_MODEL = CHECKPOINTS / "llada-small"
DEFAULT_EPS = [5e-4, 1e-3, 5e-3, 5e-2, 0.5, 2.0, 10.0]
DEFAULT_THRESHOLDS = [0.7, 0.8, 0.9, 0.95]
# per suite: (model, gen_length, steps, block_length, make target that trains the model)
SUITE_DEFAULTS = {
    "short": (None, 32, 32, 8, "make train"),
    "count": ("llada-long", 256, 256, 32, "make train-long"),
    "passages": ("llada-passages", 256, 256, 32, "surelock-train --suite passages (docs/long-answers.md)"),
}


def token_accuracy(answer: str, completion: str) -> float:
    """Fraction of the answer's tokens, and the end of turn after them, that the completion has
    at the same position (the tokenizer is byte-level, so a token is a byte; the completion is
    read up to its stop token, as `is_correct` reads it)."""
    target, got = answer.encode() + b"\x00", completion.strip().encode() + b"\x00"
    return sum(a == b for a, b in zip(target, got)) / len(target)


@dataclass(frozen=True)
class EvalConfig:
    """One run of the evaluation: SureLock's eps (None: off), its rule and gate, and the
    confidence threshold (None: fixed steps)."""

    eps: float | None = None
    threshold: float | None = None
    # None: the default rule (candidates before unmasking, KL < eps); "algorithm1":
    # candidates after unmasking and KL <= eps; "paper": the paper preset (Algorithm 1,
    # gate 0.2, one block of gen_length; with eps None, no-lock at that block length)
    rule: str | None = None
    gate: float | None = None
    kv_cache: str = "none"  # Fast-dLLM's block cache: none, prefix or dual

    @property
    def label(self) -> str:
        lock = "no-lock" if self.eps is None else f"eps={self.eps:g}"
        if self.rule == "algorithm1":
            lock = f"Alg.1 {lock}"
        elif self.rule == "paper":
            lock = f"paper preset {lock}" if self.eps is not None else "no-lock, one block"
        if self.gate is not None and self.rule != "paper":
            lock += f" gate {self.gate:g}"
        label = lock if self.threshold is None else f"thr={self.threshold:g} {lock}"
        return label if self.kv_cache == "none" else f"{self.kv_cache} cache {label}"

    @property
    def in_eps_table(self) -> bool:
        return self.threshold is None and self.kv_cache == "none"


def run_config(llm, conversations, params):
    from surelock_vllm.stats import surelock_stats

    t0 = time.perf_counter()
    outs = llm.chat(conversations, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    return wall, [o.outputs[0].text for o in outs], [surelock_stats(o) for o in outs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="short",
                        help="the task suite and its model and canvas defaults (module docstring)")
    parser.add_argument("--model", default=None, help="default: the suite's shipped model")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--eps", type=float, nargs="+", default=DEFAULT_EPS)
    parser.add_argument("--confidence-gate", type=float, default=None,
                        help="also require this confidence before locking (surelock_confidence_gate)")
    parser.add_argument("--per-task", type=int, default=50, help="held-out problems per task (at most 50)")
    parser.add_argument("--gen-length", type=int, default=None, help="default: 32 (short), 256 (count, passages)")
    parser.add_argument("--steps", type=int, default=None, help="default: gen_length")
    parser.add_argument("--block-length", type=int, default=None, help="default: 8 (short), 32 (count, passages)")
    parser.add_argument("--rule-eps", type=float, nargs="*", default=[5e-4, 5e-3, 5e-2],
                        help="eps of the lock-rule comparison: Algorithm 1's rule at each, both rules with "
                             "the 20%% gate and the paper preset at the middle one (none: skip it)")
    parser.add_argument("--no-paper-preset", dest="paper_preset", action="store_false",
                        help="leave the paper preset and its one-block no-lock baseline out of the rule comparison "
                             "(one block of gen_length has no end-of-turn stop: at 256 it denoises every position)")
    parser.add_argument("--thresholds", type=float, nargs="*", default=DEFAULT_THRESHOLDS,
                        help="confidence thresholds of the fewer-steps grid (none: skip the grid)")
    parser.add_argument("--grid-eps", type=float, default=5e-3, help="SureLock's eps in the fewer-steps grid")
    parser.add_argument("--kv-caches", nargs="*", choices=["prefix", "dual"], default=[],
                        help="block caches (Fast-dLLM's) to add to the fewer-steps grid: each with fixed steps "
                             "and every threshold, SureLock off and on")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=Path("docs/eval"))
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    model_name, gen_length, steps, block_length, train_target = SUITE_DEFAULTS[args.suite]
    default_model = DEFAULT_MODEL if model_name is None else CHECKPOINTS / model_name
    args.model = args.model or str(default_model)
    args.gen_length = args.gen_length or gen_length
    args.steps = args.steps or (steps if args.gen_length == gen_length else args.gen_length)
    args.block_length = args.block_length or (block_length if args.gen_length % block_length == 0
                                              else args.gen_length)
    if Path(args.model) == default_model and not (default_model / "config.json").exists():
        parser.error(f"--model: no trained checkpoint at {default_model}; train one with `{train_target}` "
                     "(surelock_vllm/tools/train_small.py) or pass --model")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")

    from tqdm import tqdm
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    from surelock_vllm.bench import aggregate, describe_device

    tasks = sorted(SUITES[args.suite])
    problems = _first_per_task(heldout_problems(suite=args.suite), args.per_task)
    conversations = [[{"role": "user", "content": p.prompt}] for p in problems]
    extra = {"gpu_memory_utilization": 0.3} if current_platform.is_cpu() else {}
    # the whole held-out set in one batch: every canvas (prompt + gen_length) fits a step
    batched_tokens = max(32768, len(problems) * (300 + args.gen_length))
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=1024, block_size=32, enforce_eager=True,
              max_num_seqs=len(problems), max_num_batched_tokens=batched_tokens, seed=0, **extra)

    def params(config: EvalConfig):
        diffusion = {"gen_length": args.gen_length, "steps": args.steps, "block_length": args.block_length}
        if config.threshold is not None:
            diffusion["confidence_threshold"] = config.threshold
        if config.kv_cache != "none":
            diffusion["kv_cache"] = config.kv_cache
        if config.rule == "paper":
            del diffusion["block_length"]  # the preset's one block (and for its no-lock baseline)
            if config.eps is None:
                diffusion["block_length"] = args.gen_length
        if config.eps is None:
            diffusion["surelock"] = False
        else:
            diffusion.update(surelock=True, surelock_eps=config.eps)
            gate = config.gate if config.gate is not None else args.confidence_gate
            if config.rule == "paper":
                diffusion["surelock_preset"] = "paper"
            elif gate is not None:
                diffusion["surelock_confidence_gate"] = gate
            if config.rule == "algorithm1":
                diffusion.update(surelock_candidates="after_unmask", surelock_kl_test="<=")
        return SamplingParams(max_tokens=args.gen_length, temperature=0.0, extra_args=diffusion)

    baseline = EvalConfig()
    configs = [baseline, *(EvalConfig(eps=e) for e in args.eps)]
    if args.rule_eps:
        # both lock rules, the gate on and off, and the paper preset (with its own no-lock baseline)
        middle = args.rule_eps[len(args.rule_eps) // 2]
        configs += [EvalConfig(eps=e, rule="algorithm1") for e in args.rule_eps]
        configs += [EvalConfig(eps=middle, gate=0.2), EvalConfig(eps=middle, rule="algorithm1", gate=0.2)]
        if args.paper_preset:
            configs += [EvalConfig(rule="paper"), EvalConfig(eps=middle, rule="paper")]
        configs = list(dict.fromkeys(configs))
    grid = [EvalConfig(eps=e, threshold=t) for t in args.thresholds for e in (None, args.grid_eps)]
    if args.thresholds and EvalConfig(eps=args.grid_eps) not in configs:
        grid.insert(0, EvalConfig(eps=args.grid_eps))  # fixed steps with SureLock, the grid's other baseline
    configs += grid
    configs += [EvalConfig(eps=e, threshold=t, kv_cache=k)
                for k in args.kv_caches for t in (None, *args.thresholds) for e in (None, args.grid_eps)]
    walls: dict[EvalConfig, list[float]] = {c: [] for c in configs}
    texts: dict[EvalConfig, list[str]] = {}
    stats: dict[EvalConfig, list[dict]] = {}
    try:
        run_config(llm, conversations[:2], params(baseline))  # warm-up
        with tqdm(total=len(configs) * args.repeats, desc="evaluate", unit="run") as bar:
            for r in range(args.repeats):
                for c in configs if r % 2 == 0 else list(reversed(configs)):
                    wall, texts[c], stats[c] = run_config(llm, conversations, params(c))
                    walls[c].append(wall)
                    bar.update()
    finally:
        llm.llm_engine.engine_core.shutdown()  # stop the engine processes now

    nolock_wall = statistics.median(walls[baseline])
    baseline_agg = aggregate(stats[baseline])
    report = {
        "command": "surelock-eval " + " ".join(sys.argv[1:] if argv is None else argv),
        "suite": args.suite, "tasks": tasks,
        "answer_tokens_mean": _mean(len(p.answer.encode()) for p in problems),
        "model": args.model, "dtype": args.dtype, "device": describe_device(),
        "gen_length": args.gen_length, "steps": args.steps, "block_length": args.block_length,
        "confidence_gate": args.confidence_gate, "problems": len(problems),
        "thresholds": args.thresholds, "grid_eps": args.grid_eps, "runs": [],
    }
    for c in configs:
        correct = [is_correct(p, t) for p, t in zip(problems, texts[c])]
        per_task = {task: _mean([ok for p, ok in zip(problems, correct) if p.task == task]) for task in tasks}
        token_acc = [token_accuracy(p.answer, t) for p, t in zip(problems, texts[c])]
        agg = aggregate(stats[c])
        report["runs"].append({
            "label": c.label, "eps": c.eps, "threshold": c.threshold, "rule": c.rule, "gate": c.gate,
            "kv_cache": c.kv_cache,
            "in_grid": c.threshold is not None or c.kv_cache != "none" or (
                bool(args.thresholds) and c.rule is None and c.gate is None and c.eps in (None, args.grid_eps)),
            "accuracy": _mean(correct), "accuracy_per_task": per_task,
            "token_accuracy": _mean(token_acc),
            "token_accuracy_per_task": {task: _mean(a for p, a in zip(problems, token_acc) if p.task == task)
                                        for task in tasks},
            "output_tokens_mean": _mean(len(t.strip().encode()) for t in texts[c]),
            "agreement_with_nolock": _mean([a == b for a, b in zip(texts[c], texts[baseline])]),
            "flops_ratio": agg["flops_ratio"], "dense_ratio": agg["dense_ratio"],
            "attention_ratio": agg["attention_ratio"], "rows": agg["rows"], "rows_nolock": agg["rows_nolock"],
            "rows_ratio": agg["rows_ratio"], "locked_fraction_per_step": agg["locked_fraction_per_step"],
            "steps": agg["steps"], "steps_fixed": agg["steps_fixed"],
            "steps_per_position": agg["steps"] / (len(problems) * args.gen_length),
            # against fixed-step no-lock decoding: algorithmic FLOPs (dense + attention), with the LM head, rows
            "flops_vs_baseline": _dense_attention(agg) / _dense_attention(baseline_agg),
            "total_flops_vs_baseline": agg["total_flops"] / baseline_agg["total_flops"],
            "rows_vs_baseline": agg["rows"] / baseline_agg["rows"],
            "wall_s": walls[c], "wall_ratio": statistics.median(walls[c]) / nolock_wall,
            "speedup": nolock_wall / statistics.median(walls[c]),
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


def _dense_attention(agg: dict) -> int:
    return agg["dense_flops"] + agg["attention_flops"]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def markdown_table(report: dict) -> str:
    tasks = report["tasks"]
    head = ["run", "exact match", *tasks, "token acc.", "agree w/ no-lock", "FLOPs saved", "dense", "attn", "rows computed", "wall-clock"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in report["runs"]:
        if run.get("threshold") is not None or run.get("kv_cache", "none") != "none":
            continue  # the fewer-steps grid has its own table
        lines.append("| " + " | ".join([
            run["label"], f"{run['accuracy']:.1%}", *(f"{run['accuracy_per_task'][t]:.0%}" for t in tasks),
            f"{run['token_accuracy']:.1%}", f"{run['agreement_with_nolock']:.1%}", f"{1 - run['flops_ratio']:.1%}", f"{run['dense_ratio']:.3f}",
            f"{run['attention_ratio']:.3f}", f"{run['rows']} ({run['rows_ratio']:.3f})", f"{run['wall_ratio']:.2f}x",
        ]) + " |")
    return "\n".join(lines)


def per_task_table(report: dict) -> str:
    """Exact match / token accuracy per task, for each run of the eps table."""
    runs = [r for r in report["runs"] if r.get("threshold") is None and r.get("kv_cache", "none") == "none"]
    lines = ["| task | " + " | ".join(r["label"] for r in runs) + " |", "|" + "---|" * (len(runs) + 1)]
    for task in report["tasks"]:
        lines.append(f"| {task} | " + " | ".join(
            f"{r['accuracy_per_task'][task]:.0%} / {r['token_accuracy_per_task'][task]:.1%}" for r in runs) + " |")
    return "\n".join(lines)


def grid_table(report: dict) -> str:
    """The fewer-steps grid: fixed steps vs confidence thresholds, SureLock off and on."""
    baseline = report["runs"][0]
    head = ["run", "kv_cache", "threshold", "SureLock", "exact match", "vs fixed no-lock", "steps / position",
            "steps", "FLOPs", "FLOPs +LM head", "rows", "wall-clock speedup"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in (r for r in report["runs"] if r.get("in_grid")):
        delta = (run["accuracy"] - baseline["accuracy"]) * 100
        lines.append("| " + " | ".join([
            run["label"], run.get("kv_cache", "none"), "fixed" if run["threshold"] is None else f"{run['threshold']:g}",
            "off" if run["eps"] is None else f"eps {run['eps']:g}", f"{run['accuracy']:.1%}",
            f"{delta:+.1f} pt", f"{run['steps_per_position']:.3f}", f"{run['steps'] / baseline['steps']:.3f}",
            f"{run['flops_vs_baseline']:.3f}", f"{run['total_flops_vs_baseline']:.3f}",
            f"{run['rows_vs_baseline']:.3f}", f"**{run['speedup']:.2f}x**" if run["threshold"] is not None
            else f"{run['speedup']:.2f}x",
        ]) + " |")
    best = fastest_within(report, points=1.0)
    if best is not None:
        lines += ["", f"Fastest run within 1 point of fixed-step no-lock: **{best['label']}**, "
                      f"{best['accuracy']:.1%} exact match, **{best['speedup']:.2f}x** wall-clock."]
    return "\n".join(lines)


def fastest_within(report: dict, points: float) -> dict | None:
    """The grid's fastest run whose exact match is within `points` of fixed-step no-lock's."""
    baseline = report["runs"][0]
    close = [r for r in report["runs"] if r.get("in_grid") and (baseline["accuracy"] - r["accuracy"]) * 100 <= points]
    return max(close, key=lambda r: r["speedup"], default=None)


def markdown_report(report: dict) -> str:
    nolock = report["runs"][0]
    gate = report["confidence_gate"]
    out = [
        f"# SureLock quality vs compute ({report['suite']} answers, shipped trained model)",
        "",
        f"Command: `{report['command']}`  ",
        f"Model: `{Path(report['model']).name}` ({report['dtype']}); device: {report['device']}.  ",
        f"{report['problems']} held-out problems (never in training) of the {report['suite']} suite, "
        f"answers of {report['answer_tokens_mean']:.1f} tokens on average (no-lock's outputs: "
        f"{nolock['output_tokens_mean']:.1f}), greedy, low-confidence remasking, "
        f"gen_length {report['gen_length']}, steps {report['steps']}, block_length {report['block_length']}"
        + (f", confidence gate {gate}" if gate is not None else "") + ".",
        "",
        "`exact match`: the whole answer right (per task in the task columns); `token acc.`: the",
        "fraction of the answer's tokens and its end of turn that the output has at the same position.",
        "`FLOPs saved` is algorithmic (by formula, dense + attention, LM head excluded) relative to the",
        "same sampler without locking; `dense`/`attn` are the ratios of each part; `rows computed` is",
        "the number of query rows the model ran (and its ratio to no-lock); `wall-clock` is the median",
        "run time relative to no-lock in the same run. `agree w/ no-lock`: identical completion text.",
        "Rows: the default rule (lock candidates Z formed before the step unmasks, KL < eps) at each eps;",
        "`Alg.1` the paper's Algorithm 1 (Z formed after the step unmasks, so a token can lock at the",
        "step that unmasks it, with KL <= eps); `gate 0.2` adds the 20% confidence gate; `paper preset`",
        "is Algorithm 1 with the gate and one block of gen_length (block_length = steps = gen_length),",
        "next to no-lock at that block length (`no-lock, one block`), against which its FLOPs count.",
        "",
        markdown_table(report),
        "",
        "Per task, exact match / token accuracy:",
        "",
        per_task_table(report),
        "",
        "![step-wise FLOPs ratio](stepwise_flops_ratio.png)",
        "![accuracy vs FLOPs saved](accuracy_vs_flops.png)",
        "",
    ]
    if report.get("thresholds"):
        out += [
            "## Fewer steps: confidence-threshold decoding, with and without SureLock",
            "",
            "Each step unmasks every masked position of the block whose confidence is at least the threshold",
            "(at least one; `steps` stays an upper bound), Fast-dLLM's parallel decoding; SureLock at eps "
            f"{report['grid_eps']:g}. Everything is relative to fixed-step no-lock decoding (the first row) in "
            "the same run: `steps / position` is steps taken per canvas position to generate (below 1 even",
            "with fixed steps: a chat answer stops at the block of its end of turn), `steps`, `FLOPs` (the",
            "algorithmic count, dense + attention), `FLOPs +LM head` (with the LM head over every row read)",
            "and `rows` (the rows the model ran) are totals over fixed-step no-lock's, `wall-clock speedup`",
            "the median run time of fixed-step no-lock over this run's.",
            "",
            grid_table(report),
            "",
            "![accuracy vs wall-clock speedup](accuracy_vs_speedup.png)",
            "",
        ]
    out += [
        "## Sample outputs (no-lock)",
        "",
        "| task | prompt | answer | output |",
        "|---|---|---|---|",
    ]
    for ex in nolock["examples"]:
        out.append(f"| {ex['task']} | `{ex['prompt']}` | `{ex['answer']}` | `{ex['output']}` |")
    return "\n".join(out) + "\n"


def plot_eval(report: dict, out: Path) -> list[Path]:
    from surelock_vllm.bench_plots import _plt, save_figure

    plt = _plt()
    runs = [r for r in report["runs"] if r["eps"] is not None and r.get("threshold") is None
            and r.get("kv_cache", "none") == "none"]
    default_rule = [r for r in runs if r.get("rule") is None and r.get("gate") is None]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in default_rule:
        locked = r["locked_fraction_per_step"]
        ratio = [1.0] + [1.0 - f for f in locked[:-1]]
        ax.plot([i / report["steps"] for i in range(len(ratio))], ratio, label=r["label"])
    ax.set_ylim(0, 1.05)
    _label(ax, "denoising progress (step / steps)", "FLOPs vs no-lock, per step",
           "Step-wise FLOPs ratio (trained model, held-out set)")
    stepwise = save_figure(fig, out / "stepwise_flops_ratio.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    nolock = report["runs"][0]
    ax.axhline(nolock["accuracy"] * 100, color="gray", lw=0.8, ls="--", label="no-lock")
    algorithm1 = [r for r in runs if r.get("rule") == "algorithm1" and r.get("gate") is None]
    for series, name, marker in ((default_rule, "SureLock (Z before unmasking, <)", "o"),
                                 (algorithm1, "Algorithm 1 (Z after unmasking, <=)", "s")):
        if not series:
            continue
        xs = [(1 - r["flops_ratio"]) * 100 for r in series]
        ax.plot(xs, [r["accuracy"] * 100 for r in series], marker=marker, label=name)
        for r, x in zip(series, xs):
            ax.annotate(f"{r['eps']:g}", (x, r["accuracy"] * 100), textcoords="offset points",
                        xytext=(4, -10), fontsize=8)
    _label(ax, "algorithmic FLOPs saved (%)", "exact match (%)", "Accuracy vs compute saved (labels: eps)")
    acc = save_figure(fig, out / "accuracy_vs_flops.png")
    paths = [stepwise, acc]
    if report.get("thresholds"):
        paths.append(plot_grid(report, out, plt))
    return paths


def plot_grid(report: dict, out: Path, plt) -> Path:
    """Accuracy vs wall-clock speedup over fixed-step no-lock, SureLock off and on."""
    from surelock_vllm.bench_plots import save_figure

    grid = [r for r in report["runs"] if r.get("in_grid")]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    baseline = report["runs"][0]
    ax.axhline(baseline["accuracy"] * 100, color="gray", lw=0.8, ls="--", label="fixed steps, no-lock")
    ax.axhspan(baseline["accuracy"] * 100 - 1, baseline["accuracy"] * 100 + 1, color="gray", alpha=0.12)
    series = [(kv, locked) for kv in ("none", "prefix", "dual") for locked in (False, True)]
    for kv, locked in series:
        runs = sorted((r for r in grid if (r["eps"] is not None) == locked and r.get("kv_cache", "none") == kv),
                      key=lambda r: r["speedup"])
        if not runs:
            continue
        name = ("" if kv == "none" else f"{kv} cache, ") + ("SureLock on" if locked else "SureLock off")
        marker = {"none": "os", "prefix": "^v", "dual": "DP"}[kv][locked]
        ax.plot([r["speedup"] for r in runs], [r["accuracy"] * 100 for r in runs], marker=marker, label=name)
        for r in runs:
            ax.annotate("fixed" if r["threshold"] is None else f"{r['threshold']:g}",
                        (r["speedup"], r["accuracy"] * 100), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(3.0, color="tab:red", lw=0.8, ls=":")
    _label(ax, "wall-clock speedup vs fixed-step no-lock", "exact match (%)",
           ("Threshold x SureLock x block cache" if any(r.get("kv_cache", "none") != "none" for r in grid)
            else "Threshold decoding x SureLock") + " (labels: threshold)")
    return save_figure(fig, out / "accuracy_vs_speedup.png")


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)


if __name__ == "__main__":
    sys.exit(main())
