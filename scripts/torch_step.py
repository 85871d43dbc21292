"""PyTorch reference for `clip-wgpu bench`: one training step of the `tiny`
CLIP config (or b32, or clip-roberta: ViT-B/32 vision + roberta-base text, run_clip.py's
VisionTextDualEncoderModel) with transformers + torch.optim.AdamW on the CPU (or CUDA
when available), text padded to 77 tokens.

Run by hand with torch + transformers installed:
  python scripts/torch_step.py [--config tiny|b32|clip-roberta] [--batch 32] [--reps 5] [--threads N]
Prints the median forward, backward and optimizer times and images/s.
"""
import argparse
import statistics
import time

import torch
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, RobertaConfig,
                          VisionTextDualEncoderConfig, VisionTextDualEncoderModel)

p = argparse.ArgumentParser()
p.add_argument("--config", default="tiny", choices=["tiny", "b32", "clip-roberta"])
p.add_argument("--batch", type=int, default=32)
p.add_argument("--reps", type=int, default=5)
p.add_argument("--threads", type=int, default=0)
# Mixed precision as run_clip's --bf16 runs it: the forward under autocast.
p.add_argument("--autocast", choices=["off", "bf16", "fp16"], default="off")
a = p.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
if a.config == "tiny":
    v = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             image_size=64, patch_size=8, hidden_act="quick_gelu")
    t = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
    proj = 128
else:
    v = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
             image_size=224, patch_size=32)
    t = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
             max_position_embeddings=77, vocab_size=49408)
    proj = 512
dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
if a.config == "clip-roberta":
    # clip-wgpu bench's clip-roberta: roberta-base's sizes, no dropout (the
    # kernels compared are the same; clip-wgpu has no dropout).
    rob = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                        layer_norm_eps=1e-5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    vis = CLIPVisionConfig(hidden_act="quick_gelu", **v)
    cfg = VisionTextDualEncoderConfig.from_vision_text_configs(vis, rob, projection_dim=proj)
    model = VisionTextDualEncoderModel(cfg).to(dev).train()
else:
    model = CLIPModel(CLIPConfig(vision_config=v, text_config=t, projection_dim=proj)).to(dev).train()
opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
B, S, T = a.batch, v["image_size"], 77
px = torch.randn(B, 3, S, S, device=dev)
ids = torch.randint(0, 40000, (B, T), device=dev)
ids[:, T // 2] = 49407
mask = torch.zeros(B, T, dtype=torch.long, device=dev)
mask[:, : T // 2 + 1] = 1


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.autocast]
# fp16 needs loss scaling (GradScaler) as the Trainer does.
scaler = torch.amp.GradScaler(dev, enabled=a.autocast == "fp16")
fw, bw, op = [], [], []
for i in range(a.reps + 1):
    sync(); t0 = time.perf_counter()
    with torch.autocast(device_type=dev, dtype=amp or torch.float32, enabled=amp is not None):
        out = model(input_ids=ids, attention_mask=mask, pixel_values=px, return_loss=True)
    sync(); t1 = time.perf_counter()
    scaler.scale(out.loss).backward()
    sync(); t2 = time.perf_counter()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt); scaler.update(); opt.zero_grad(set_to_none=True)
    sync(); t3 = time.perf_counter()
    if i:
        fw.append(t1 - t0); bw.append(t2 - t1); op.append(t3 - t2)
f, b, o = (statistics.median(x) * 1e3 for x in (fw, bw, op))
print(f"torch {torch.__version__} on {dev} ({torch.get_num_threads()} threads), {a.config} batch {B}"
      f"{'' if amp is None else ', autocast ' + a.autocast}: "
      f"forward {f:.1f} ms, backward {b:.1f} ms, optimizer {o:.1f} ms, {B / ((f + b + o) / 1e3):.1f} images/s")
