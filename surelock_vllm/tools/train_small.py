"""Train the shipped small LLaDA-format model with LLaDA's SFT objective.

    python -m surelock_vllm.tools.train_small out/llada-small-stage1       # ~55 min on 2 CPU cores
    python -m surelock_vllm.tools.train_small /tmp/smoke --steps 5         # smoke run
    make train-long     # --suite count: 256-token responses (answers of 99-239 bytes), resumable

`--suite count` trains the long-answer model (checkpoints/llada-long) on the
count suite (surelock_vllm.tasks) with `--response-length 256`;
`--suite passages` on copies of long passages, which no run here has learned
(docs/long-answers.md has every run). With
`--resume`, a run continues from OUT/train_state.pt (fp32 weights, AdamW
moments, the masking generator, and the position in both problem streams,
saved every `--save-every` steps and at the end) to the weights an
uninterrupted run has at the same step; `--stop-after N` stops an invocation
after N steps with its state saved.

The shipped checkpoints/llada-small is that run continued twice with
`--init-from`: 5,000 steps with more addition and lookup problems, then 4,500
with addition and lookup drawn 6x as often as each other task (`make train`
runs the three stages; the Makefile's TRAIN_STAGE2 and TRAIN_STAGE3 have the
flags).

The data are generated problems with exactly checkable answers
(`surelock_vllm.tasks`). Each example is the chat-templated prompt followed by
a response of exactly `--response-length` tokens: the answer, `<|eot_id|>`,
then `<|endoftext|>` padding, as in LLaDA's SFT, so at inference the model
fills a `gen_length = response_length` canvas with the answer and EOS.

Curriculum: the first `--first-steps` steps draw only `--first-tasks`
(default: 1,000 steps of uppercasing, a pure copy task). A small masked
diffusion model learns to copy from the prompt (attention that lines up an
answer position with its source position) abruptly, after a few hundred steps
of a copy task on its own; in the full mix the same circuit had not formed
after 3,000 steps. From then on all tasks are mixed, the ones that need more
than copying (addition, sorting, reversal) drawn twice as often.

Objective (LLaDA, SFT): the prompt is kept; every response token is masked
with probability p = (1 - 1e-3) t + 1e-3, t ~ U(0, 1) per example (stratified
over the batch to lower the variance); the loss is the cross-entropy of the
masked tokens weighted by 1/p, summed and divided by the response length.

Deterministic for a seed on one device type (data, init, masking). The
output is a checkpoint in LLaDA-8B-Instruct's format (same config keys and
weight names) written by `make_checkpoint.write_checkpoint`, plus a
`training_log.json` next to it. Uses CUDA when present.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from surelock_vllm.configuration_llada import LLaDAConfig
from surelock_vllm.reference.modeling import LLaDAReferenceLM, apply_rotary, rotary_cos_sin
from surelock_vllm.tasks import SUITES, Problem, heldout_problems, is_correct, training_stream
from surelock_vllm.tools.make_checkpoint import (
    PRESETS, build_tokenizer, chat_prompt_ids, llada_config, write_checkpoint,
)

MASK_EPS = 1e-3  # LLaDA's floor on the masking probability
# after the curriculum's first phase: tasks that need more than copying come up twice as often
TASK_WEIGHTS = {"short": {"add": 2.0, "sort": 2.0, "reverse": 2.0},
                "passages": {"chain": 2.0, "reverse_words": 1.5, "caesar": 1.5},
                "count_ranges": {"count_hundreds": 1.5, "count_down": 1.5}, "count": {},
                "count_train": {f"{name}_few": 0.5 for name in ("up", "down", "by_two", "by_five")}}
FIRST_TASKS = {"short": ["upper"], "passages": ["copy"], "count_ranges": ["count_up"], "count": ["up"],
               "count_train": ["up"]}
STATE_FILE = "train_state.pt"  # what --resume continues from (fp32 weights, optimizer, random streams)


class ExampleEncoder:
    """Problem -> (prompt ids, response ids) with the checkpoint's tokenizer and chat template."""

    def __init__(self, tokenizer, response_length: int):
        self.tokenizer = tokenizer
        self.response_length = response_length
        self.eos = tokenizer.eos_token_id
        self.eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")

    def prompt_ids(self, problem: Problem) -> list[int]:
        return chat_prompt_ids(self.tokenizer, problem.prompt)

    def response_ids(self, problem: Problem) -> list[int]:
        answer = self.tokenizer.encode(problem.answer, add_special_tokens=False) + [self.eot]
        if len(answer) > self.response_length:
            raise ValueError(f"answer of {len(answer)} tokens exceeds --response-length {self.response_length}")
        return answer + [self.eos] * (self.response_length - len(answer))


def forward_batch(model: LLaDAReferenceLM, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of right-padded sequences; `valid` [B, T] marks real tokens.

    The same weights and operations as `LLaDAReferenceLM.forward_rows`
    (bidirectional attention, RoPE at positions 0..len-1), batched, with
    padding hidden from attention, and with autograd.
    """
    cfg = model.config
    t = model.model.transformer
    batch, length = ids.shape
    heads, kv_heads, head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    cos, sin = rotary_cos_sin(torch.arange(length, device=ids.device), head_dim, cfg.rope_theta)
    keep = valid[:, None, None, :]  # [B, 1, 1, T]: attend to real tokens only
    x = t.wte(ids)
    for block in t.blocks:
        h = block.attn_norm(x)
        q = apply_rotary(block.q_proj(h).view(batch, length, heads, head_dim), cos, sin)
        k = apply_rotary(block.k_proj(h).view(batch, length, kv_heads, head_dim), cos, sin)
        v = block.v_proj(h).view(batch, length, kv_heads, head_dim)
        groups = heads // kv_heads
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep
        )
        x = x + block.attn_out(out.transpose(1, 2).reshape(batch, length, -1))
        h = block.ff_norm(x)
        x = x + block.ff_out(F.silu(block.ff_proj(h)) * block.up_proj(h))
    return t.ff_out(t.ln_f(x))[..., : cfg.vocab_size]


def make_batch(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-pad prompt+response; returns ids, valid mask and response mask [B, T]."""
    length = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    valid = torch.zeros(len(examples), length, dtype=torch.bool)
    response = torch.zeros_like(valid)
    for i, (p, r) in enumerate(examples):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        valid[i, : len(p) + len(r)] = True
        response[i, len(p) : len(p) + len(r)] = True
    return ids, valid, response


def diffusion_loss(model, ids, valid, response, mask_id: int, response_length: int, generator) -> torch.Tensor:
    """LLaDA's SFT loss for one batch (module docstring)."""
    batch = ids.shape[0]
    # Stratified t: one draw per example in each of `batch` equal slices of (0, 1).
    t = (torch.arange(batch) + torch.rand(batch, generator=generator)) / batch
    t = t[torch.randperm(batch, generator=generator)]
    p_mask = ((1 - MASK_EPS) * t + MASK_EPS)[:, None].expand(ids.shape)
    masked = (torch.rand(ids.shape, generator=generator) < p_mask) & response
    noisy = torch.where(masked.to(ids.device), mask_id, ids)
    logits = forward_batch(model, noisy, valid.to(ids.device))
    ce = F.cross_entropy(logits[masked.to(ids.device)].float(), ids[masked.to(ids.device)], reduction="none")
    return (ce / p_mask[masked].to(ce.device)).sum() / (batch * response_length)


@torch.no_grad()
def quick_accuracy(model, encoder: ExampleEncoder, problems: list[Problem], mask_id: int) -> dict[str, float]:
    """Exact match with the reference sampler (greedy, low-confidence, 4 blocks, one step a token)."""
    from surelock_vllm.diffusion.options import DiffusionOptions
    from surelock_vllm.reference.sampler import reference_generate

    model.eval()
    gen = encoder.response_length
    options = DiffusionOptions.resolve({"steps": gen, "block_length": gen // 4}, max_tokens=gen, temperature=0.0)
    # The reference sampler runs on the CPU; on CUDA, probe a CPU copy.
    cpu_model = model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
    per_task: dict[str, list[bool]] = {}
    for problem in problems:
        out = reference_generate(cpu_model, encoder.prompt_ids(problem), options, mask_id)
        text = encoder.tokenizer.decode(_until_stop(out, encoder), skip_special_tokens=True)
        per_task.setdefault(problem.task, []).append(is_correct(problem, text))
    model.train()
    return {task: sum(v) / len(v) for task, v in sorted(per_task.items())}


def _until_stop(ids: list[int], encoder: ExampleEncoder) -> list[int]:
    for i, tok in enumerate(ids):
        if tok in (encoder.eos, encoder.eot):
            return ids[:i]
    return ids


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args) -> Path:
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
        # Tiny gradients turn into denormals that slow CPU math several-fold.
        torch.set_flush_denormal(True)
    tokenizer = build_tokenizer()
    config_dict = llada_config(tokenizer, PRESETS[args.preset], args.max_sequence_length)
    config = LLaDAConfig(**config_dict)
    model = LLaDAReferenceLM(config)
    _init_weights(model, config, args.seed)
    if args.init_from is not None:
        # continue from a checkpoint's weights (fresh optimizer and schedule)
        model.load_state_dict(LLaDAReferenceLM.from_pretrained(args.init_from).state_dict())
    model.to(device).train()
    encoder = ExampleEncoder(tokenizer, args.response_length)
    heldout = heldout_problems(suite=args.suite)
    exclude = {p.prompt for p in heldout}
    earlier = None if args.init_from is None else Path(args.init_from) / "training_log.json"
    earlier_log = json.loads(earlier.read_text()) if earlier is not None and earlier.exists() else None
    first_stream = training_stream(args.seed, exclude, tasks=args.first_tasks, suite=args.suite,
                                   answer_bytes=args.answer_bytes)
    stream = training_stream(args.seed + 1, exclude, tasks=args.tasks, weights=args.task_weights, suite=args.suite,
                             answer_bytes=args.answer_bytes)
    probe_every = 10 if args.suite == "short" else 50  # the long suites' probe: one problem a task
    probe = [p for i, p in enumerate(heldout) if i % probe_every == 0 and (not args.tasks or p.task in args.tasks)]
    generator = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    log: list[dict] = []
    first_step, elapsed_before = 0, 0.0
    state_path = Path(args.out) / STATE_FILE
    if args.resume and state_path.exists():
        # Continue where the last save stopped: same weights, optimizer moments, masking
        # generator and position in both problem streams (replayed: problems are cheap).
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["argv"] != _run_defining_args(args):
            raise SystemExit(f"--resume: {state_path} was written by a run with other arguments "
                             f"({state['argv']}); pass the same ones or another output directory")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        first_step, log, elapsed_before = state["step"], state["log"], state["elapsed_s"]
        for step in range(first_step):
            source = first_stream if step < args.first_steps else stream
            for _ in range(args.batch_size):
                next(source)
        print(f"resumed {state_path} at step {first_step}")
    start = time.perf_counter() - elapsed_before
    last = min(args.steps, args.stop_at) if args.stop_at else args.steps
    bar = tqdm(range(first_step, last), desc="train", unit="step", initial=first_step, total=args.steps)
    for step in bar:
        source = first_stream if step < args.first_steps else stream
        examples = [(encoder.prompt_ids(p), encoder.response_ids(p)) for p in (next(source) for _ in range(args.batch_size))]
        ids, valid, response = make_batch(examples, tokenizer.eos_token_id)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        loss = diffusion_loss(model, ids.to(device), valid, response, config.mask_token_id, args.response_length, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        entry = {"step": step + 1, "loss": round(loss.item(), 4), "elapsed_s": round(time.perf_counter() - start, 1)}
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            entry["probe_accuracy"] = quick_accuracy(model, encoder, probe, config.mask_token_id)
            tqdm.write(f"step {step + 1}: loss {loss.item():.3f}, probe exact match {entry['probe_accuracy']}")
        log.append(entry)
        if args.save_every and (step + 1) % args.save_every == 0:
            _save(model, args, log, earlier_log)
            _save_state(state_path, model, opt, generator, step + 1, log, time.perf_counter() - start, args)
        if args.stop_after and step + 1 - first_step >= args.stop_after:
            _save_state(state_path, model, opt, generator, step + 1, log, time.perf_counter() - start, args)
            print(f"stopped after {args.stop_after} steps at step {step + 1}; continue with --resume")
            return _save(model, args, log, earlier_log)
    if first_step < last or last == args.steps:
        _save_state(state_path, model, opt, generator, last, log, time.perf_counter() - start, args)
    if last < args.steps:
        print(f"stopped at step {last} of {args.steps} (--stop-at)")
    return _save(model, args, log, earlier_log)


def _run_defining_args(args) -> list[str]:
    """The command line without the flags that only say how this invocation runs."""
    out, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
        elif a == "--resume":
            continue
        elif a in ("--stop-after", "--stop-at"):
            skip = True
        elif not a.startswith(("--stop-after=", "--stop-at=")):
            out.append(a)
    return out


def _save_state(path: Path, model, opt, generator, step: int, log: list[dict], elapsed: float, args) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "generator": generator.get_state(), "log": log, "elapsed_s": elapsed,
                "argv": _run_defining_args(args)}, tmp)
    tmp.replace(path)  # a run killed mid-save keeps the previous state


def _init_weights(model: LLaDAReferenceLM, config: LLaDAConfig, seed: int) -> None:
    """Small normal init (std 0.02, output projections scaled by depth), unit norms."""
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
            torch.nn.init.ones_(param)
            continue
        std = 0.02
        if name.endswith("attn_out.weight") or (name.endswith("ff_out.weight") and ".blocks." in name):
            std /= math.sqrt(2 * config.n_layers)
        with torch.no_grad():
            param.copy_(torch.randn(param.shape, generator=g) * std)


def _save(model: LLaDAReferenceLM, args, log: list[dict], earlier_log: dict | None) -> Path:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = write_checkpoint(args.out, args.preset, args.seed, args.max_sequence_length, state_dict=state)
    meta = {
        "command": "python -m surelock_vllm.tools.train_small " + " ".join(args.argv),
        "preset": args.preset, "suite": args.suite, "seed": args.seed, "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr, "response_length": args.response_length, "first_tasks": args.first_tasks,
        "first_steps": args.first_steps, "task_weights": args.task_weights, "answer_bytes": args.answer_bytes,
        "init_from": None if args.init_from is None else str(args.init_from),
        "device": str(next(model.parameters()).device), "log": log,
    }
    if earlier_log is not None:
        meta["init_from_training_log"] = earlier_log  # the run this one continued
    (Path(args.out) / "training_log.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


ALL_TASKS = sorted({name for tasks in SUITES.values() for name in tasks})


def _task_weight(text: str) -> tuple[str, float]:
    task, _, weight = text.partition("=")
    if task not in ALL_TASKS or not weight:
        raise argparse.ArgumentTypeError(f"expected TASK=WEIGHT with TASK one of {ALL_TASKS}, got {text!r}")
    return task, float(weight)


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="trained")
    parser.add_argument("--steps", type=int, default=7000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--max-sequence-length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=1000, help="probe exact match every N steps (0: never)")
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--suite", choices=sorted(SUITES), default="short",
                        help="the task suite (surelock_vllm.tasks): short answers, or long ones (count, passages: "
                             "64-250 bytes, with --response-length 256)")
    parser.add_argument("--tasks", nargs="+", choices=ALL_TASKS, default=None,
                        help="after the first phase, train on these tasks only (default: all of the suite)")
    parser.add_argument("--first-tasks", nargs="+", choices=ALL_TASKS, default=None,
                        help=f"the curriculum's first phase draws only these tasks (default {FIRST_TASKS})")
    parser.add_argument("--first-steps", type=int, default=1000, help="length of the first phase (0: none)")
    parser.add_argument("--task-weights", nargs="+", type=_task_weight, default=None, metavar="TASK=WEIGHT",
                        help=f"odds of each task after the first phase (default {TASK_WEIGHTS}, others 1)")
    parser.add_argument("--answer-bytes", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="passages suite: train on answers of MIN-MAX bytes (a length curriculum's stage; "
                             "the held-out set and its probe keep each task's own range)")
    parser.add_argument("--resume", action="store_true",
                        help=f"continue from OUT/{STATE_FILE} (written every --save-every steps) if it exists")
    parser.add_argument("--stop-after", type=int, default=0,
                        help="stop after this many steps of this invocation, saving the state for --resume")
    parser.add_argument("--stop-at", type=int, default=0,
                        help="stop at this step of the --steps schedule (a stage that runs part of a longer "
                             "schedule), state saved; resumed there, only the weights are written again")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where CUDA is present")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from this checkpoint's weights (same --preset) instead of a fresh init")
    args = parser.parse_args(argv)
    suite_tasks = SUITES[args.suite]
    args.first_tasks = args.first_tasks or FIRST_TASKS[args.suite]
    args.task_weights = dict(args.task_weights) if args.task_weights else dict(TASK_WEIGHTS[args.suite])
    if args.answer_bytes is not None:
        low, high = args.answer_bytes
        if args.suite != "passages":
            parser.error("--answer-bytes: only the passages suite's tasks take a length range")
        if not 1 <= low <= high < args.response_length:
            parser.error(f"--answer-bytes: expected 1 <= MIN <= MAX < --response-length "
                         f"({args.response_length}, the answer and its end of turn), got {low} {high}")
    for flag, names in (("--tasks", args.tasks or []), ("--first-tasks", args.first_tasks),
                        ("--task-weights", args.task_weights)):
        if unknown := sorted(set(names) - set(suite_tasks)):
            parser.error(f"{flag}: {unknown} not in the {args.suite} suite ({sorted(suite_tasks)})")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    random.seed(args.seed)
    path = train(args)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
