#!/usr/bin/env bash
# The prepared GPU check (issue 41): everything this project wants measured on a GPU, in one call
# that ends inside 10 minutes (the steps' limits add up to 510 s), each step's output in $OUT/<step>.log and a table at the end.
#
#   1. tests/test_cuda.py: a meta-training step gives the CPU's losses and gradients on the GPU;
#   2. the metanetwork backends (torch, PyG) forward and backward on the ResNet-56 graph at the
#      paper's sizes (8 layers, width 64): bench/metanet.py;
#   3. meta-training steps under DDP with NCCL: bench/ddp_step.py;
#   4. 2:4 semi-structured against dense products: bench/semi_structured.py;
#   5. the realistic-scale check: a CIFAR-10 ResNet-20 at 32x32 trained on the GPU (aim: 90% within
#      3 minutes), pruned at 2x by magnitude, FPGM, curve and the shipped meta: bench/realistic.py.
#
# On the device machine (python3 there holds PyTorch; the rest travels as wheels, README of the
# device tool), prepared here once:
#   printf '/.whl/\n/gpu-data/\n' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 torch-pruning==1.6.1
#   mkdir -p gpu-data && cp ../shared/data/cifar10-jpeg.tar.gz gpu-data/
# then run there with carry [".whl", "gpu-data"]:   bash bench/gpu_check.sh
#
# --smoke: the same steps on the CPU at tiny sizes (tests/test_gpu_check.py runs it): the script is
# known to work before a GPU is at hand; its numbers mean nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
if [[ -d .whl ]] && ! $PY -c "import torch_pruning, pydantic" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DATA_ROOT=${DATA_ROOT:-data/cifar10-jpeg}
if [[ $SMOKE == 0 && ! -d $DATA_ROOT && -f gpu-data/cifar10-jpeg.tar.gz ]]; then
  mkdir -p /tmp/gpu-data && tar -xzf gpu-data/cifar10-jpeg.tar.gz -C /tmp/gpu-data
  DATA_ROOT=$(dirname "$(find /tmp/gpu-data -maxdepth 3 -type d -name train | head -1)")
fi

FAILED=0
printf '| step | exit | seconds |\n|---|---|---|\n' > "$OUT/summary.md"
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log it, note its exit code and time
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  local began=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [[ $rc -ne 0 ]] && FAILED=1
  # each row as soon as its step ends: a call cut short still brings back the rows before
  echo "| $name | $rc | $((SECONDS - began)) |" >> "$OUT/summary.md"
  echo "== $name: exit $rc, $((SECONDS - began)) s"
}

if [[ $SMOKE == 1 ]]; then
  $PY -c "import torch; print('device: cpu (smoke), torch', torch.__version__)"
  step cuda_tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
  step backends 120 $PY bench/metanet.py --device cpu --backends torch --passes forward --layers 2 --hidden 8 --repeats 1
  step ddp 120 $PY bench/ddp_step.py --device cpu --members 2 --epochs 1
  step semi_structured 60 $PY bench/semi_structured.py --shapes 64x64 --tokens 64 --iters 2 --repeats 3
  step realistic 240 $PY bench/realistic.py --smoke --before-steps 5
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  # 510 s of steps at most, with the set-up inside the device tool's 600 s per command
  step cuda_tests 80 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
  step backends 80 $PY bench/metanet.py --device cuda --backends torch pyg --passes forward forward+backward --repeats 3
  step ddp 50 $PY bench/ddp_step.py --device cuda
  step semi_structured 30 $PY bench/semi_structured.py
  step realistic 270 $PY bench/realistic.py --data-root "$DATA_ROOT"
fi
echo
cat "$OUT/summary.md"
exit $FAILED
