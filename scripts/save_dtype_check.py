"""Check that transformers loads models saved with --save_dtype f16 / bf16 and
that their outputs match the f32 save of the same weights.

    for d in f32 f16 bf16; do clip-wgpu train ... --output_dir out_$d --save_dtype $d; done
    /work/.venv-ref/bin/python scripts/save_dtype_check.py out_f32 out_f16 out_bf16

Prints, per folder and per way of loading (its config's dtype, "auto", and
upcast to float32), max |output - f32 output| / max |f32 output| for the image
and text embeddings and logits_per_image, on seeded random pictures.
"""

import json
import sys

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel


def main():
    ref_dir, *half_dirs = sys.argv[1:]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 34, 3), dtype=np.uint8)) for _ in range(6)]
    texts = ["a red picture number 0", "a green picture", "a blue one", "yellow",
             "a purple picture number 4", "orange"]
    proc = AutoProcessor.from_pretrained(ref_dir)
    inp = proc(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = CLIPModel.from_pretrained(ref_dir).eval()(**inp)
    for d in half_dirs:
        print(d, "config dtype:", json.load(open(f"{d}/config.json"))["dtype"])
        for load in ["auto", torch.float32]:
            m = CLIPModel.from_pretrained(d, dtype=load).eval()
            pdt = next(m.parameters()).dtype
            x = {k: (v.to(pdt) if v.is_floating_point() else v) for k, v in inp.items()}
            with torch.no_grad():
                out = m(**x)
            for k in ["image_embeds", "text_embeds", "logits_per_image"]:
                a, b = getattr(out, k).float(), getattr(ref, k)
                err = ((a - b).abs().max() / b.abs().max()).item()
                print(f"  loaded as {pdt}: {k} {err:.2e}")


if __name__ == "__main__":
    main()
