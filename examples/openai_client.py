"""Query a `vllm serve ... --plugin surelock` server with the OpenAI client.

    examples/serve.sh &          # or any vllm serve ... --plugin surelock
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1

Diffusion and SureLock options go in `extra_body={"vllm_xargs": {...}}`.
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id

    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Reverse: vllm"}],
        max_tokens=32,  # the shipped model (examples/serve.sh) was trained on 32-token answers
        temperature=0.0,
        extra_body={"vllm_xargs": {"steps": 32, "block_length": 8, "surelock_eps": 5e-3}},
    )
    print("chat:", repr(chat.choices[0].message.content))
    stats = (chat.model_extra or {}).get("kv_transfer_params", {}).get("surelock")
    if stats:
        print(f"  SureLock: {stats['rows']} rows computed vs {stats['rows_nolock']} without locking, "
              f"algorithmic FLOPs x{stats['flops_ratio']:.3f}")

    print("stream: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Uppercase: river stone light night"}],
        max_tokens=32, temperature=0.0, stream=True,
        extra_body={"vllm_xargs": {"steps": 32, "block_length": 8}},
    )
    for chunk in stream:  # text arrives one finished block (8 tokens) at a time
        if chunk.choices and chunk.choices[0].delta.content:
            print(repr(chunk.choices[0].delta.content), end=" ", flush=True)
    print()


if __name__ == "__main__":
    main()
