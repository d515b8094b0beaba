"""Offline generation with LLaDA through vLLM (`LLM.generate`).

    python examples/offline_generate.py                      # the shipped trained model (checkpoints/llada-small)
    python examples/offline_generate.py --model checkpoints/llada-long   # a long-answer model (make train-long)
    python examples/offline_generate.py --model GSAI-ML/LLaDA-8B-Instruct --dtype bfloat16

A trained model answers only in the range it was trained for (its
training_log.json): llada-small in a 32-token canvas (block 8), a long-suite
model (make train-long) in a 256-token one (block 32). The demo uses that
range and prints it.

Diffusion options travel per request in `SamplingParams.extra_args`:
gen_length (default: max_tokens), steps, block_length, remasking.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm import LLM, SamplingParams
from vllm.platforms import current_platform

from surelock_vllm.stats import surelock_stats

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
DEFAULT_MODEL = CHECKPOINTS / "llada-small"
# the kinds of problem each shipped model was trained on (surelock_vllm/tasks.py), and its canvas
QUESTIONS = {
    "short": ["What is 58 + 67?", "Reverse: vllm", "Sort: 7 1 8 2 3",
              "Uppercase: river stone light", "Repeat ab 4 times.", "k=moon, q=fire, z=lake. What is q?"],
    # held-out problems (never in training), one per task
    "count": ["Count 50 numbers up from 328.", "Count 50 numbers down from 981.",
              "Count 40 numbers by two from 821.", "Count 45 numbers by five from 603."],
}
CANVAS = {"short": (32, 8), "count": (256, 32)}  # (gen_length, block_length) of the training responses


def trained_range(model: str) -> tuple[str, int] | None:
    """(task suite, response length) a shipped model was trained on, from its training log."""
    log = Path(model) / "training_log.json"
    if not log.exists():
        return None
    meta = json.loads(log.read_text())
    return meta.get("suite", "short"), meta["response_length"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--dtype", default="float32")
    # default: the canvas the model was trained on (llada-small: 32 tokens, 4 blocks of 8), one token per step
    parser.add_argument("--gen-length", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--block-length", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--no-surelock", dest="surelock", action="store_false", help="denoise without locking")
    args = parser.parse_args()
    trained = trained_range(args.model)
    suite = trained[0] if trained else "short"
    gen_length, block_length = CANVAS[suite]
    args.gen_length = args.gen_length or gen_length
    args.steps = args.steps or args.gen_length
    args.block_length = args.block_length or (block_length if args.gen_length % block_length == 0 else args.gen_length)

    extra = {} if not current_platform.is_cpu() else {"gpu_memory_utilization": 0.3}
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=1024, block_size=32, enforce_eager=True, **extra)
    params = SamplingParams(
        max_tokens=args.gen_length,
        temperature=args.temperature,
        extra_args={"steps": args.steps, "block_length": args.block_length, "remasking": "low_confidence",
                    "surelock": args.surelock},
    )
    questions = QUESTIONS[suite]
    conversations = [[{"role": "user", "content": q}] for q in questions]
    outputs = llm.chat(conversations, params)
    if Path(args.model) == CHECKPOINTS / "llada-tiny":
        print("\nNote: checkpoints/llada-tiny has random weights (it exercises the real"
              " loading and serving code); its answers are not meant to be meaningful.")
    for question, out in zip(questions, outputs):
        completion = out.outputs[0]
        stats = surelock_stats(out)
        saved = f", SureLock saved {1 - stats['flops_ratio']:.0%} of FLOPs" if stats and args.surelock else ""
        print(f"\nQ: {question}\nA: {completion.text!r}  ({len(completion.token_ids)} tokens, {completion.finish_reason}{saved})")
    if trained:
        print(f"\nUsable range: {Path(args.model).name} was trained on the {trained[0]} task suite with "
              f"{trained[1]}-token responses (gen_length {gen_length}, block_length {block_length}); "
              "at other lengths its answers are wrong or empty."
              + (" For answers of 100-250 tokens: --model checkpoints/llada-long."
                 if suite == "short" and (CHECKPOINTS / "llada-long" / "config.json").exists() else ""))


if __name__ == "__main__":
    main()
