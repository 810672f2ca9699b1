#!/usr/bin/env bash
# Puts back the trained models behind the committed reports of results/, which the tree no
# longer tracks (they made it too large to travel), and checks each against its sha256.
#
#     bash tools/fetch_models.sh            (from anywhere inside the clone)
#
# Each results folder that had models lists them in its MODELS.sha256 (sha256sum's format,
# paths relative to that folder); commit MODELS_COMMIT holds every one of them. A model
# already on disk is only checked. A shallow clone may lack that commit: fetch it first,
# `git fetch --unshallow` or `git fetch origin MODELS_COMMIT`.
set -euo pipefail
MODELS_COMMIT=8c5a982d0f2398e785a96eea4530779b7c618555
cd "$(git rev-parse --show-toplevel)"
if ! git cat-file -e "$MODELS_COMMIT^{commit}" 2>/dev/null; then
  echo "This clone lacks commit $MODELS_COMMIT (a shallow clone?): run" \
       "'git fetch origin $MODELS_COMMIT' or 'git fetch --unshallow', then again." >&2
  exit 1
fi
for list in $(git ls-files 'results/*MODELS.sha256'); do
  folder=$(dirname "$list")
  while read -r _ path; do
    if [ ! -f "$folder/$path" ]; then
      mkdir -p "$(dirname "$folder/$path")"
      # Written beside the target and renamed, so that a stop leaves no half file.
      git show "$MODELS_COMMIT:$folder/$path" > "$folder/$path.part"
      mv "$folder/$path.part" "$folder/$path"
    fi
  done < "$list"
  (cd "$folder" && sha256sum -c MODELS.sha256)
done
