"""An English corpus that needs no dataset download: the documentation that Debian packages ship
(prose written by people, with some code), cut into JSONL documents of about C4's length.

    python3 scripts/english_corpus.py data/english          # needs apt-get (Debian/Ubuntu) and network once

Sources, one `<source>.jsonl.gz` each (fields: text), documents of paragraphs gathered up to ~3000
characters (the paper's tokenizer learns only from documents of at most 4192 bytes):
    python-docs    python3.11-doc: the reStructuredText sources of the Python documentation
    linux-docs     linux-doc-6.1: the kernel's Documentation/ (reStructuredText and text; translations left out)
    perl-docs      perl-doc: Perl's manual pages in POD
    git-docs       git-doc: Git's manual in AsciiDoc
    postgres-docs  postgresql-doc-15: the PostgreSQL manual, HTML reduced to its text
    vim-docs       vim-doc: Vim's user and reference manuals, HTML reduced to its text
    debian-docs    debian-reference-en and gnu-standards, HTML reduced to its text
Prints the documents and characters of each source.
"""

from __future__ import annotations

import gzip
import html.parser
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = {
    "python-docs": (["python3.11-doc"], ["usr/share/doc/python3.11/html/_sources/**/*.rst.txt"]),
    "linux-docs": (
        ["linux-doc-6.1"],
        [
            "usr/share/doc/linux-doc-6.1/Documentation/**/*.rst.gz",
            "usr/share/doc/linux-doc-6.1/Documentation/**/*.txt.gz",
        ],
    ),
    "perl-docs": (["perl-doc"], ["usr/share/perl/**/pod/*.pod", "usr/share/perl/**/pod/*.pod.gz"]),
    "git-docs": (["git-doc"], ["usr/share/doc/git-doc/**/*.txt"]),
    "postgres-docs": (["postgresql-doc-15"], ["usr/share/doc/postgresql-doc-15/html/*.html"]),
    "vim-docs": (["vim-doc"], ["usr/share/doc/vim/html/*.html"]),
    "debian-docs": (
        ["debian-reference-en", "gnu-standards"],
        ["usr/share/debian-reference/*.en.html", "usr/share/doc/gnu-standards/**/*.html"],
    ),
}
SKIP = re.compile(r"/translations/|/(zh_CN|zh_TW|ja_JP|ko_KR|it_IT|sp_SP|pt_BR)/")
DOCUMENT_CHARS = 3000


class _Text(html.parser.HTMLParser):
    """The visible text of an HTML page, paragraphs separated by blank lines."""

    BLOCKS = {
        "p",
        "div",
        "pre",
        "li",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "tr",
        "dt",
        "dd",
        "table",
        "br",
        "section",
        "blockquote",
    }

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "head", "nav"):
            self.skip += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "head", "nav"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)

    def text(self) -> str:
        raw = "".join(self.parts)
        paragraphs = [re.sub(r"[ \t]+\n", "\n", p).strip() for p in re.split(r"\n\s*\n", raw)]
        return "\n\n".join(p for p in paragraphs if p)


def read(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    if ".html" in path.name:
        parser = _Text()
        parser.feed(text)
        text = parser.text()
    return text


def documents(text: str):
    chunk = ""
    for para in text.split("\n\n"):
        para = para.strip("\n")
        if not para.strip():
            continue
        if chunk and len(chunk) + len(para) > DOCUMENT_CHARS:
            yield chunk
            chunk = ""
        chunk = f"{chunk}\n\n{para}" if chunk else para
    if chunk.strip():
        yield chunk


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for source, (packages, patterns) in PACKAGES.items():
            root = tmp / source
            root.mkdir()
            for package in packages:
                subprocess.run(["apt-get", "download", package], cwd=root, check=True, capture_output=True)
            for deb in root.glob("*.deb"):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(root / "x")], check=True)
            files = sorted(
                {
                    f
                    for pattern in patterns
                    for f in (root / "x").glob(pattern)
                    if f.is_file() and not SKIP.search(str(f))
                }
            )
            n_docs = n_chars = 0
            with gzip.open(out / f"{source}.jsonl.gz", "wt", encoding="utf-8") as f:
                for path in files:
                    for doc in documents(read(path)):
                        f.write(json.dumps({"text": doc}) + "\n")
                        n_docs += 1
                        n_chars += len(doc)
            print(f"{source:14s} {len(files):5d} files {n_docs:7d} documents {n_chars / 1e6:6.1f}M characters")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/english"))
