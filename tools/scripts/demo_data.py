#!/usr/bin/env python3
"""The demo model's data: the King James Bible (public domain) from Debian's `bible-kjv-text`,
read with Debian's `bible` program (package `bible-kjv`), one JSON Lines record per chapter.

    python3 tools/scripts/demo_data.py --out target/demo-data

Writes train.jsonl (19 of every 20 chapters), held-out.jsonl (every 20th chapter, 60 chapters) and
last-word.jsonl (held-out verses of 12 words or more ending in a word then a full stop: LAMBADA's
shape, for `layerwise eval last-word`). Each chapter's text is its verses, one per line, without
numbers. Needs apt-get (downloads the two packages, installs nothing) and Python's standard library.
"""
import argparse
import glob
import json
import os
import re
import subprocess
import tempfile


def chapters(bible_dir):
    exe = os.path.join(bible_dir, "usr/bin/bible")
    text = subprocess.run([exe, "-p", os.path.join(bible_dir, "usr/lib"), "-l9999", "gen1:1-rev22:21"],
                          check=True, capture_output=True, text=True).stdout
    title, verses = None, []
    for line in text.splitlines():
        verse = re.match(r"^\s+\d+ (.*)$", line)
        if verse:
            verses.append(verse.group(1).strip())
        elif line.strip():
            if title and verses:
                yield title, verses
            title, verses = line.strip(), []
    if title and verses:
        yield title, verses


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="target/demo-data")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "bible-kjv", "bible-kjv-text"], cwd=tmp, check=True,
                       capture_output=True)
        root = os.path.join(tmp, "root")
        for deb in glob.glob(os.path.join(tmp, "*.deb")):
            subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
        all_chapters = list(chapters(root))
    train, held_out, last_word = [], [], []
    for i, (title, verses) in enumerate(all_chapters):
        record = {"title": title, "text": "\n".join(verses)}
        if i % 20 == 19:
            held_out.append(record)
            for v in verses:
                if len(v.split()) >= 12 and re.search(r"[A-Za-z]\.$", v):
                    last_word.append({"text": v[:-1]})
        else:
            train.append(record)
    for name, rows in [("train", train), ("held-out", held_out), ("last-word", last_word)]:
        with open(os.path.join(args.out, f"{name}.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"{name}.jsonl: {len(rows)} records")


if __name__ == "__main__":
    main()
