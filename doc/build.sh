#!/usr/bin/env bash
# Build the pqsk documentation site, with warnings as errors.
#
#   bash doc/build.sh                      # full build: runs every example
#   bash doc/build.sh -D plot_gallery=0    # quick build: examples not run
#
# Extra arguments go to sphinx-build.  Output: doc/_build/html/index.html.
set -euo pipefail
cd "$(dirname "$0")/.."
out=doc/_build/html
stamp="$out/.build-complete"      # written by doc/conf.py when the build ends
rm -f "$stamp"
python -m sphinx -W --keep-going -b html "$@" doc "$out"
if [ ! -f "$stamp" ]; then
    echo "doc/build.sh: the build stopped before its end (did an example call sys.exit()?)" >&2
    exit 1
fi
