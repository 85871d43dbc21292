#!/usr/bin/env python3
"""A synthetic evaluation set the size of COCO 2017 val, in COCO's layout.

    python3 scripts/coco_sized.py OUT [--images 5000] [--captions 25014] [--size 80x60]

writes OUT/val2017/NNNNNNNNNNNN.png (small pictures of coloured shapes),
OUT/annotations/captions_val2017.json (every picture has 5 captions, the
remainder go one each to the first pictures, as COCO val's 25,014 for 5,000;
annotations in a shuffled order, as COCO's are not grouped by picture) and a
small captions_train2017.json. Standard library only (PNG written with zlib),
seeded: the same files every time. Read it with

    clip-wgpu eval --dataset_name ydshieh/coco_dataset_script --data_dir OUT ...
"""
import argparse
import json
import os
import random
import struct
import zlib

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
    "yellow": (235, 220, 40), "purple": (150, 60, 190), "orange": (245, 140, 30),
    "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ["circle", "square", "triangle", "stripe"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the middle"]
NOUNS = ["dog", "cat", "bus", "man", "woman", "kite", "pizza", "train", "boat", "bird",
         "horse", "table", "plate", "street", "beach", "field", "kitchen", "bench"]
VERBS = ["sitting", "standing", "parked", "flying", "lying", "walking", "waiting"]


def png(path, w, h, rows):
    raw = b"".join(b"\x00" + bytes(r) for r in rows)
    def chunk(kind, data):
        c = struct.pack(">I", len(data)) + kind + data
        return c + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(chunk(b"IEND", b""))


def picture(rng, w, h):
    bg = tuple(rng.randrange(256) for _ in range(3))
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    place = rng.randrange(len(PLACES))
    cx, cy = [(0.25, 0.5), (0.75, 0.5), (0.5, 0.25), (0.5, 0.75), (0.5, 0.5)][place]
    cx, cy, r = cx * w, cy * h, min(w, h) * rng.uniform(0.15, 0.3)
    fg = COLOURS[colour]
    rows = []
    for y in range(h):
        row = []
        for x in range(w):
            dx, dy = x - cx, y - cy
            inside = {
                "circle": dx * dx + dy * dy <= r * r,
                "square": abs(dx) <= r and abs(dy) <= r,
                "triangle": -r <= dy <= r and abs(dx) <= (dy + r) / 2,
                "stripe": abs(dx) <= r / 3,
            }[shape]
            row.extend(fg if inside else bg)
        rows.append(row)
    return rows, colour, shape, PLACES[place]


ADJS = ["small", "large", "bright", "dark", "shiny", "old", "new", "wooden", "round", "tall",
        "tiny", "huge", "pale", "striped", "dotted", "plain", "busy", "quiet", "sunny", "empty"]
PEOPLE = ["a man", "a woman", "a child", "two people", "a group of people", "a boy", "a girl",
          "an old man", "a young woman", "a family"]


def captions(rng, colour, shape, place, n):
    """n different captions of about COCO's length (10.5 words on average),
    rarely repeated across the set (96% distinct)."""
    out = []
    while len(out) < n:
        noun, verb, adj = rng.choice(NOUNS), rng.choice(VERBS), rng.choice(ADJS)
        other, who = rng.choice(NOUNS), rng.choice(PEOPLE)
        c = rng.choice([
            f"a {adj} {colour} {shape} {place} near a {noun}",
            f"{who} {verb} near a {colour} {shape} and a {noun}",
            f"a {colour} {shape} {place} of a {adj} {noun}",
            f"a {adj} {noun} and a {colour} {shape} {place}",
            f"{who} with a {adj} {noun} and a {colour} {shape}",
        ])
        if c not in out:
            out.append(c)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--captions", type=int, default=25014)
    ap.add_argument("--size", default="80x60")
    ap.add_argument("--seed", type=int, default=2017)
    a = ap.parse_args()
    w, h = map(int, a.size.split("x"))
    rng = random.Random(a.seed)
    os.makedirs(os.path.join(a.out, "val2017"), exist_ok=True)
    os.makedirs(os.path.join(a.out, "train2017"), exist_ok=True)
    os.makedirs(os.path.join(a.out, "annotations"), exist_ok=True)
    per, extra = divmod(a.captions, a.images)
    images, anns = [], []
    for i in range(a.images):
        image_id = 100000 + i * 7
        name = f"{image_id:012d}.png"
        rows, colour, shape, place = picture(rng, w, h)
        png(os.path.join(a.out, "val2017", name), w, h, rows)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for c in captions(rng, colour, shape, place, per + (1 if i < extra else 0)):
            anns.append({"image_id": image_id, "caption": c})
    rng.shuffle(anns)
    for k, ann in enumerate(anns):
        ann["id"] = k + 1
    with open(os.path.join(a.out, "annotations", "captions_val2017.json"), "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    # A one-picture train split, for commands that read it.
    tr = images[:1]
    os.link(os.path.join(a.out, "val2017", tr[0]["file_name"]),
            os.path.join(a.out, "train2017", tr[0]["file_name"])) \
        if not os.path.exists(os.path.join(a.out, "train2017", tr[0]["file_name"])) else None
    with open(os.path.join(a.out, "annotations", "captions_train2017.json"), "w") as f:
        json.dump({"images": tr, "annotations": [{"id": 1, "image_id": tr[0]["id"],
                                                   "caption": "a picture"}]}, f)
    print(f"{a.out}: {a.images} pictures, {len(anns)} captions")


if __name__ == "__main__":
    main()
