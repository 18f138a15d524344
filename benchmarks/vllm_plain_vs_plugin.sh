#!/usr/bin/env bash
# vLLM-CPU, same session, one text request each (300 random words, 32 tokens, ignore_eos): its own Llama
# (dummy weights, bf16, ../shared/peers/vllm-cpu-serve) vs the `export vllm` folder with our plugin (bf16).
# Does the plugin cost vLLM anything on text? Usage: benchmarks/vllm_plain_vs_plugin.sh CHECKPOINT FOLDER VLLM_VENV > OUT.jsonl
set -u
CK=$1; FOLDER=$2; V=$3; HERE=$(cd "$(dirname "$0")" && pwd)
wait_up() { for i in $(seq 1 300); do curl -sf "$1/v1/models" >/dev/null && return 0; sleep 2; done; return 1; }
setsid "$HERE/../../shared/peers/vllm-cpu-serve" "$CK" 8021 "$V" > /tmp/plain.log 2>&1 &
P=$!; wait_up http://127.0.0.1:8021 && "$V/bin/python" "$HERE/tpot_probe.py" http://127.0.0.1:8021 peer 32; kill -- -$P; sleep 15
setsid env VLLM_CPU_KVCACHE_SPACE=4 "$V/bin/python" -m vllm.entrypoints.openai.api_server --model "$FOLDER" --host 127.0.0.1 --port 8022 \
  --max-model-len 2048 --enforce-eager --dtype bfloat16 > /tmp/plugin.log 2>&1 &
P=$!; wait_up http://127.0.0.1:8022 && "$V/bin/python" "$HERE/tpot_probe.py" http://127.0.0.1:8022 "$FOLDER" 32; kill -- -$P; sleep 10
