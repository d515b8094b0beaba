"""SureLock vs. the same sampler without locking vs. the plain-torch reference.

    surelock-bench --gen-lengths 256 --batch-sizes 8 --eps 5e-4 5e-3 5e-2

One engine, one run: for every (gen_length, batch) cell the no-lock sampler
and SureLock at each eps run back to back on the same prompts, repeated
`--repeats` times in alternating order; wall-clock ratios come from medians.
FLOPs are algorithmic, by formula (attention and dense separately). The
plain-torch reference sampler (full canvas every step, batch 1) runs on the
first `--reference-requests` prompts of each cell.

Correctness gate (nonzero exit on failure), so that a speedup can never come
from wrong answers:
* SureLock with eps = 0 returns exactly the no-lock tokens;
* for every eps, `--check-requests` requests are replayed through the
  plain-torch SureLock reference and must match it token for token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "llada-tiny"

QUESTIONS = [
    "What is 17 + 25?", "Reverse the word 'diffusion'.", "Sort 5, 3, 9, 1.",
    "Name three colours.", "Count the letters in 'banana'.", "What is 9 times 7?",
    "Spell 'lock' backwards.", "List the even numbers below 10.", "What comes after Tuesday?",
    "Repeat 'ab' three times.", "What is 100 - 37?", "Capitalise 'hello world'.",
]


@dataclass
class RunResult:
    label: str
    eps: float | None
    wall_s: list[float] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    stats: list[dict] = field(default_factory=list)
    steps: int = 0

    @property
    def median_s(self) -> float:
        return statistics.median(self.wall_s)


def build_prompts(tokenizer, batch: int) -> list[list[int]]:
    prompts = []
    for i in range(batch):
        q = QUESTIONS[i % len(QUESTIONS)]
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return prompts


def sampling_params(gen_length: int, block_length: int, eps: float | None):
    from vllm import SamplingParams

    extra = {"gen_length": gen_length, "steps": gen_length, "block_length": block_length}
    extra.update({"surelock": False} if eps is None else {"surelock": True, "surelock_eps": eps})
    return SamplingParams(max_tokens=gen_length, temperature=0.0, ignore_eos=True, extra_args=extra)


def run_engine(llm, prompts, params) -> tuple[float, list[list[int]], list[dict]]:
    from surelock_vllm.stats import surelock_stats

    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    return wall, [list(o.outputs[0].token_ids) for o in outs], [surelock_stats(o) for o in outs]


def aggregate(stats: list[dict]) -> dict:
    keys = ("rows", "rows_nolock", "dense_flops", "dense_flops_nolock", "attention_flops",
            "attention_flops_nolock", "lm_head_flops", "steps")
    total = {k: sum(s[k] for s in stats) for k in keys}
    base = total["dense_flops_nolock"] + total["attention_flops_nolock"]
    total["flops_ratio"] = (total["dense_flops"] + total["attention_flops"]) / base
    total["dense_ratio"] = total["dense_flops"] / total["dense_flops_nolock"]
    total["attention_ratio"] = total["attention_flops"] / total["attention_flops_nolock"]
    total["rows_ratio"] = total["rows"] / total["rows_nolock"]
    # per-step locked fraction, averaged over requests (the paper's Figure 2 axis)
    n = min(len(s["locked_fraction"]) for s in stats)
    total["locked_fraction_per_step"] = [statistics.fmean(s["locked_fraction"][i] for s in stats) for i in range(n)]
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--gen-lengths", type=int, nargs="+", default=[256])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--eps", type=float, nargs="+", default=[5e-4, 5e-3, 5e-2])
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reference-requests", type=int, default=1)
    parser.add_argument("--check-requests", type=int, default=1)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--out", type=Path, default=Path("out/bench.json"))
    args = parser.parse_args(argv)

    import torch
    from tqdm import tqdm
    from vllm import LLM
    from vllm.platforms import current_platform

    from surelock_vllm.diffusion.options import DiffusionOptions
    from surelock_vllm.diffusion.surelock import SureLockOptions
    from surelock_vllm.reference.modeling import LLaDAReferenceLM
    from surelock_vllm.reference.sampler import reference_generate
    from surelock_vllm.reference.surelock import reference_generate_surelock

    max_len = max(args.gen_lengths) + 64
    extra = {"gpu_memory_utilization": 0.3} if current_platform.is_cpu() else {}
    llm = LLM(
        model=args.model, dtype=args.dtype, max_model_len=max(1024, max_len), block_size=32,
        enforce_eager=True, max_num_seqs=max(args.batch_sizes),
        max_num_batched_tokens=args.max_num_batched_tokens, seed=0, **extra,
    )
    tokenizer = llm.get_tokenizer()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    ref_model = LLaDAReferenceLM.from_pretrained(args.model, dtype)
    mask_id = ref_model.config.mask_token_id
    cells = [(g, b) for g in args.gen_lengths for b in args.batch_sizes]
    configs: list[float | None] = [None, 0.0, *args.eps]
    report = {"model": args.model, "dtype": args.dtype, "device": str(current_platform.device_name), "cells": []}
    failures: list[str] = []

    with tqdm(total=len(cells) * len(configs) * args.repeats, desc="engine runs", unit="run") as bar:
        for gen_length, batch in cells:
            block = args.block_length if gen_length % args.block_length == 0 else gen_length
            prompts = build_prompts(tokenizer, batch)
            results = {c: RunResult("no-lock" if c is None else f"eps={c:g}", c) for c in configs}
            run_engine(llm, prompts[:1], sampling_params(32, 32, None))  # warm-up
            for r in range(args.repeats):
                order = configs if r % 2 == 0 else list(reversed(configs))
                for c in order:
                    wall, tokens, stats = run_engine(llm, prompts, sampling_params(gen_length, block, c))
                    res = results[c]
                    res.wall_s.append(wall)
                    res.tokens, res.stats = tokens, stats
                    bar.update()
            nolock = results[None]
            if results[0.0].tokens != nolock.tokens:
                failures.append(f"gen {gen_length} batch {batch}: SureLock eps=0 differs from no-lock")
            options = DiffusionOptions.resolve({"steps": gen_length, "block_length": block}, max_tokens=gen_length, temperature=0.0)
            for eps in args.eps:
                for i in range(min(args.check_requests, batch)):
                    ref = reference_generate_surelock(ref_model, prompts[i], options, SureLockOptions(enabled=True, eps=eps), mask_id)
                    if ref.tokens != results[eps].tokens[i]:
                        failures.append(f"gen {gen_length} batch {batch} eps {eps:g}: request {i} differs from the SureLock reference")
            # plain-torch reference sampler, batch 1, full canvas every step
            n_ref = min(args.reference_requests, batch)
            t0 = time.perf_counter()
            for i in range(n_ref):
                ref_tokens = reference_generate(ref_model, prompts[i], options, mask_id)
                if ref_tokens != nolock.tokens[i]:
                    failures.append(f"gen {gen_length} batch {batch}: no-lock request {i} differs from the reference sampler")
            ref_per_request = (time.perf_counter() - t0) / max(n_ref, 1)
            tokens_out = batch * gen_length
            cell = {
                "gen_length": gen_length, "batch": batch, "block_length": block,
                "reference_s_per_request": ref_per_request,
                "reference_tokens_per_s": gen_length / ref_per_request,
                "runs": {},
            }
            for c, res in results.items():
                agg = aggregate(res.stats)
                agree = statistics.fmean(
                    sum(a == b for a, b in zip(t, n)) / len(n) for t, n in zip(res.tokens, nolock.tokens)
                )
                cell["runs"][res.label] = {
                    "eps": c, "wall_s": res.wall_s, "median_s": res.median_s,
                    "tokens_per_s": tokens_out / res.median_s,
                    "speedup_vs_nolock": nolock.median_s / res.median_s,
                    "speedup_vs_reference": (ref_per_request * batch) / res.median_s,
                    "token_agreement_with_nolock": agree, **agg,
                }
            report["cells"].append(cell)
            print_cell(cell)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")
    if failures:
        print("\nCORRECTNESS FAILURES:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("correctness gate: SureLock eps=0 == no-lock, SureLock == plain-torch SureLock reference, no-lock == reference sampler")
    return 0


def print_cell(cell: dict) -> None:
    print(f"\n== gen_length {cell['gen_length']}, batch {cell['batch']}, block {cell['block_length']} ==")
    print(f"reference sampler (plain torch, batch 1): {cell['reference_tokens_per_s']:.1f} tok/s")
    header = f"{'run':<12}{'median s':>9}{'tok/s':>9}{'x no-lock':>10}{'x ref':>8}{'FLOPs':>8}{'dense':>8}{'attn':>8}{'rows':>8}{'agree':>8}"
    print(header)
    for label, r in cell["runs"].items():
        print(
            f"{label:<12}{r['median_s']:>9.3f}{r['tokens_per_s']:>9.1f}{r['speedup_vs_nolock']:>10.2f}"
            f"{r['speedup_vs_reference']:>8.2f}{r['flops_ratio']:>8.3f}{r['dense_ratio']:>8.3f}"
            f"{r['attention_ratio']:>8.3f}{r['rows_ratio']:>8.3f}{r['token_agreement_with_nolock']:>8.1%}"
        )


if __name__ == "__main__":
    sys.exit(main())
