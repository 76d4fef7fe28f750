#!/usr/bin/env bash
# Create .venv/label-studio/, Label Studio's own virtual environment: its pins (setuptools, numpy,
# Django stack) conflict with the project's, so it never shares .venv/'s packages. The DELSE backend
# (in .venv/) only needs label-studio-sdk's brush RLE converter (numpy + Pillow): the SDK goes into
# .venv/ without its dependencies, which pin an older OpenCV than the project's. Idempotent: a stamp
# keyed on the pinned versions and this script makes a second run return at once.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
LS_VERSION=1.23.2
SDK_VERSION=2.1.2  # the one label-studio $LS_VERSION installs
VENV=.venv/label-studio
STAMP=$VENV/.setup-stamp
want=$(echo "label-studio==$LS_VERSION label-studio-sdk==$SDK_VERSION" | cat - tools/setup/setup_label_studio.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
$VENV/bin/python -m pip install -q --upgrade pip
$VENV/bin/python -m pip install -q "label-studio==$LS_VERSION"
$VENV/bin/python -c "import label_studio, label_studio_sdk.converter.brush"
.venv/bin/python -m pip install -q --no-deps "label-studio-sdk==$SDK_VERSION"
.venv/bin/python -c "import label_studio_sdk.converter.brush" >/dev/null
echo "label-studio: ok, $LS_VERSION in $VENV; label-studio-sdk $SDK_VERSION (converter) in .venv"
echo "$want" > "$STAMP"
