#!/usr/bin/env bash
# The GPU benchmark, prepared as one script for a lent H100/H200 (the device tool): moecli and
# transformers side by side in bf16 on the same random-weight checkpoints, the measured HBM
# bandwidth (decode floor) in the same run, the Pallas expert kernels against the pure-JAX scans
# (whole model, and one layer in bench/gpu_layer.py), and the sharded path on one GPU.
#
#   Here, once:   echo /.whl/ >> .git/info/exclude
#                 python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                   --implementation cp --platform manylinux2014_x86_64 -d .whl dm-haiku==0.0.17 jmp
#                 (the H200 image has everything else moecli imports: jax 0.11.2, typer, rich, click,
#                 safetensors, sentencepiece, tokenizers, jinja2, tabulate; .library/device/KINDS.md)
#   Device tool:  run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=540)
#
# Results land in $OUT/*.json; copy the figures into BENCHMARKS.md with the device and versions.
set -uo pipefail
OUT=${OUT:-/tmp/moecli-gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # moecli from this checkout, for bench/gpu_layer.py too
fi
export PYTHONUNBUFFERED=1 MOECLI_CACHE=/tmp/moecli-cache
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, torch, transformers; print(jax.__version__, jax.devices(), torch.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -c "from moecli.kernels.gpu import pallas; print('Pallas self-check:', pallas.self_check() or 'passed')" | tee -a "$OUT/gpu.txt"
# One MoE layer's decode: the Pallas kernel, the pure-JAX scan and the HBM floor (issue 6's shapes).
timeout 120 python3 bench/gpu_layer.py 2>&1 | tee "$OUT/layer.txt" | tail -4
# OLMoE side by side (plain XLA, the GPU default), then the Pallas expert kernels
# (moecli/kernels/gpu/pallas.py, opt-in with MOECLI_GPU_KERNELS=1) against those XLA paths, on the same files; then the big shape that fits: Mixtral-8x7B (93 GB bf16) only
# on an H200, Qwen3-30B-A3B (61 GB) on an H100.
timeout 240 python3 -m moecli bench olmoe-1b-7b --compare-hf --dtype bfloat16 --json "$OUT/olmoe-1b-7b.json" 2>&1 | tail -25
MOECLI_GPU_KERNELS=1 timeout 120 python3 -m moecli bench olmoe-1b-7b --dtype bfloat16 \
  --json "$OUT/olmoe-1b-7b-pallas.json" 2>&1 | tail -25
# Quantized weights on the GPU: the XLA dequantize-then-dot fallback (no Pallas kernel reads packed
# bytes yet), q8 and q4, on the same OLMoE files; and gpt-oss-20b with its MXFP4 experts kept packed.
for q in q8 q4; do
  timeout 120 python3 -m moecli bench olmoe-1b-7b --dtype bfloat16 --quantize "$q" \
    --json "$OUT/olmoe-1b-7b-$q.json" 2>&1 | tail -8
done
timeout 240 python3 -m moecli bench gpt-oss-20b --dtype bfloat16 --prompt-len 128 --new-tokens 32 \
  --json "$OUT/gpt-oss-20b.json" 2>&1 | tail -8
big=qwen3-30b-a3b
python3 -c "import torch; exit(0 if torch.cuda.get_device_properties(0).total_memory > 120e9 else 1)" && big=mixtral-8x7b
timeout 240 python3 -m moecli bench "$big" --compare-hf --dtype bfloat16 --json "$OUT/$big.json" 2>&1 | tail -25
# The sharded code path on one GPU (a mesh of one device still goes through shard_map when --devices
# is given on a multi-GPU machine; on one GPU this checks placement and the single-device path).
python3 -m moecli info "$MOECLI_CACHE/bench/olmoe-1b-7b-bfloat16" --devices 1 || true
