#!/usr/bin/env bash
# An English corpus that needs no dataset download: the reStructuredText sources of the Python 3.11
# documentation (Debian's python3.11-doc package, ~500 files, 12 MB of prose and examples), one document
# per file, written to DIR (default data/english). Needs apt-get (Debian/Ubuntu) and network access once.
set -euo pipefail
out=${1:-data/english}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download python3.11-doc >/dev/null)
dpkg-deb -x "$tmp"/python3.11-doc_*.deb "$tmp/x"
mkdir -p "$out"
src="$tmp/x/usr/share/doc/python3.11/html/_sources"
find "$src" -name "*.rst.txt" | while read -r f; do
  rel=${f#"$src"/}
  cp "$f" "$out/$(echo "${rel%.rst.txt}" | tr / _).txt"
done
echo "$(ls "$out" | wc -l) documents, $(du -sh "$out" | cut -f1) in $out"
