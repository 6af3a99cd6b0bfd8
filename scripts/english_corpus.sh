#!/usr/bin/env bash
# An English corpus that needs no dataset download: the reStructuredText sources of the Python 3.11
# documentation (Debian's python3.11-doc package, ~500 files, 12 MB of prose and examples), written as
# DIR/python-docs.jsonl (default DIR: data/english), one {"text": ...} document per run of paragraphs of
# at most ~3000 characters, so documents have the length of C4's (the paper's tokenizer learns only from
# documents up to 4192 bytes). Needs apt-get (Debian/Ubuntu) and network access once.
set -euo pipefail
out=${1:-data/english}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download python3.11-doc >/dev/null 2>&1)
dpkg-deb -x "$tmp"/python3.11-doc_*.deb "$tmp/x"
mkdir -p "$out"
python3 - "$tmp/x/usr/share/doc/python3.11/html/_sources" "$out/python-docs.jsonl" <<'PY'
import json, pathlib, sys
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
docs = []
for f in sorted(src.rglob("*.rst.txt")):
    chunk = ""
    for para in f.read_text(encoding="utf-8").split("\n\n"):
        if chunk and len(chunk) + len(para) > 3000:
            docs.append(chunk)
            chunk = ""
        chunk = f"{chunk}\n\n{para}" if chunk else para
    if chunk.strip():
        docs.append(chunk)
with open(dst, "w", encoding="utf-8") as out:
    for d in docs:
        out.write(json.dumps({"text": d}) + "\n")
print(f"{len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f}M characters in {dst}")
PY
