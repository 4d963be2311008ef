#!/usr/bin/env bash
# The device check: every GPU figure dldr needs, in one in-process run (no Ray, no network) of about
# 5 minutes on one H200 (253 s measured). Results: OUT/gpu-PRESET.json (every figure, the GPU's name), .md and .png.
#
#   benchmarks/gpu_check.sh OUT [gpu|smoke]
#
# Needs python3 with torch, torchvision, timm, numba, xxhash, safetensors, fsspec, pyyaml, tqdm,
# threadpoolctl, scikit-learn, matplotlib and pytest; dldr itself runs from this checkout. The
# Fashion-MNIST runs read its four IDX files from DLDR_FASHION_MNIST (default: ./data/fashion-mnist,
# else the Debian package's folder). `smoke` runs it all at CPU sizes, as the test suite does.
set -euo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT [gpu|smoke]}
preset=${2:-gpu}
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -z "${DLDR_FASHION_MNIST:-}" ] && [ -d "$root/data/fashion-mnist" ]; then
    export DLDR_FASHION_MNIST="$root/data/fashion-mnist"
fi
cd "$root"
python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
exec python3 -m dldr bench gpu --preset "$preset" --out "$out"
