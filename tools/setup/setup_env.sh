#!/usr/bin/env bash
# Create .venv/ at the repo root and install everything the project needs. Idempotent: a stamp
# file records the hash of the inputs, and a second run with the same inputs does nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.setup-stamp
want=$(cat requirements.txt setup.py tools/setup/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
VPY=$VENV/bin/python
$VPY -m pip install -q --upgrade pip
$VPY -m pip install -q -r requirements.txt
if $VPY -c "import detectron2" 2>/dev/null; then
  echo "setup: using the detectron2 already importable in .venv ($($VPY -c 'import detectron2;print(detectron2.__file__)'))"
else
  # detectron2 is not published on PyPI. sal-detectron2 is a faithful snapshot of upstream main
  # tagged cp310; its pure-Python part runs on any Python 3.x. Its native _C is optional.
  purelib=$($VPY -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')
  $VPY -m pip install -q --no-deps --upgrade --target "$purelib" --python-version 3.10 \
    --only-binary=:all: sal-detectron2==0.7.2
fi
$VPY -m pip install -q --no-deps --no-build-isolation -e .
$VPY -c "import detectron2, levelset, levelset_d2, levelset_rcnn, delse; print('setup: ok, detectron2', detectron2.__version__)"
echo "$want" > "$STAMP"
