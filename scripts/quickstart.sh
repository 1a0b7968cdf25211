#!/usr/bin/env bash
# Fresh machine -> the main job, offline: install, index the sample photos that ship inside
# scikit-image with the built-in `starter` model, then run text queries, a calibrated query and
# a composed (reference image + modification text) query, printing the results.
set -euo pipefail
. "$(dirname "$0")/venv.sh"

WORK="${CALIBCLIP_QUICKSTART_DIR:-runs/quickstart}"
PHOTOS="$(python -c 'import os, skimage; print(os.path.join(os.path.dirname(skimage.__file__), "data"))')"
mkdir -p "$WORK"

echo "== indexing the scikit-image sample photos in $PHOTOS (model: starter, with calibrated vectors)"
calibclip index "$PHOTOS" --out "$WORK/index" --calibrate --workers 1
calibclip info "$WORK/index"

for q in "a cat lying down" "an astronaut in a space suit" "a cup of coffee" "a horse" "a rocket on a launch pad"; do
    echo "== text query: $q"
    calibclip search "$WORK/index" --text "$q" --top-k 3
done

echo "== calibrated text query (CalibCLIP re-ranking of the top-K)"
calibclip search "$WORK/index" --text "a person in a white suit holding a flag" --top-k 3 --calibrate

echo "== composed query: reference chelsea.png + 'a dog instead of the cat'"
calibclip search "$WORK/index" --image "$PHOTOS/chelsea.png" --text "a dog instead of the cat" --top-k 3
