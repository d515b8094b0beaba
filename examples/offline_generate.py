"""Offline generation with LLaDA through vLLM (`LLM.generate`).

    python examples/offline_generate.py                      # the shipped trained model (checkpoints/llada-small)
    python examples/offline_generate.py --model GSAI-ML/LLaDA-8B-Instruct --dtype bfloat16

Diffusion options travel per request in `SamplingParams.extra_args`:
gen_length (default: max_tokens), steps, block_length, remasking.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vllm import LLM, SamplingParams
from vllm.platforms import current_platform

from surelock_vllm.stats import surelock_stats

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
DEFAULT_MODEL = CHECKPOINTS / "llada-small"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--dtype", default="float32")
    # llada-small was trained on 32-token responses: 4 blocks of 8, one token per step
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--no-surelock", dest="surelock", action="store_false", help="denoise without locking")
    args = parser.parse_args()

    extra = {} if not current_platform.is_cpu() else {"gpu_memory_utilization": 0.3}
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=1024, block_size=32, enforce_eager=True, **extra)
    params = SamplingParams(
        max_tokens=args.gen_length,
        temperature=args.temperature,
        extra_args={"steps": args.steps, "block_length": args.block_length, "remasking": "low_confidence",
                    "surelock": args.surelock},
    )
    # Problems of the kinds surelock_vllm/tasks.py generates: the tasks llada-small was trained on.
    questions = ["What is 58 + 67?", "Reverse: vllm", "Sort: 7 1 8 2 3",
                 "Uppercase: river stone light", "Repeat ab 4 times.", "k=moon, q=fire, z=lake. What is q?"]
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


if __name__ == "__main__":
    main()
