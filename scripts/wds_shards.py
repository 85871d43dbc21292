#!/usr/bin/env python3
"""Write WebDataset shards from a folder of pictures with NAME.txt captions.

The layout img2dataset writes: OUT/00000.tar, 00001.tar, ... each holding
samples `000000000.png` (or .jpg, ...), `000000000.txt` (the caption) and
`000000000.json` ({"caption": ..., "path": ...}), written with Python's
tarfile in a stream (mode "w|"), as WebDataset's TarWriter does.

    scripts/wds_shards.py /usr/share/tuxpaint/stamps shards --shards 100 --repeat 10

Pictures are the ones `clip-wgpu train --data_dir` takes (PNG, JPEG, WebP,
GIF, BMP with a NAME.txt beside them; the caption is its first non-empty
line), in sorted order, repeated --repeat times, dealt into --shards shards
of equal size (the last ones one smaller).
"""
import argparse
import io
import json
import os
import sys
import tarfile
import time

EXTS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}


def pictures(root):
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        names = set(files)
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext.lower() not in EXTS:
                continue
            txt = next((t for t in (stem + ".txt", stem + ".TXT") if t in names), None)
            if txt is None:
                continue
            with open(os.path.join(d, txt), encoding="utf-8", errors="replace") as fh:
                lines = [l.strip() for l in fh.read().lstrip("\ufeff").splitlines()]
            cap = next((l for l in lines if l), None)
            if cap:
                out.append((os.path.join(d, f), ext.lower().lstrip("."), cap))
    return out


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--shards", type=int, default=10)
    p.add_argument("--repeat", type=int, default=1)
    a = p.parse_args()
    pics = pictures(a.src) * a.repeat
    if not pics:
        sys.exit(f"no captioned pictures under {a.src}")
    os.makedirs(a.out, exist_ok=True)
    n = len(pics)
    k = 0
    for s in range(a.shards):
        lo, hi = s * n // a.shards, (s + 1) * n // a.shards
        with tarfile.open(os.path.join(a.out, f"{s:05d}.tar"), "w|") as tar:
            for path, ext, cap in pics[lo:hi]:
                key = f"{k:09d}"
                with open(path, "rb") as fh:
                    add(tar, f"{key}.{ext}", fh.read())
                add(tar, f"{key}.txt", cap.encode())
                add(tar, f"{key}.json", json.dumps({"caption": cap, "path": path}).encode())
                k += 1
    print(f"{n} samples in {a.shards} shards in {a.out}")


if __name__ == "__main__":
    main()
