"""PyTorch twin of atop's AE purifier network (src/purifier/ae.rs: DMAE-style ViT encoder over
the visible patches, light ViT decoder over every patch), for the agreement test. Parameter
names match atop's safetensors files.

Usage:
  python ae.py step --config JSON --weights W.safetensors --data IN.safetensors --out OUT.safetensors
    IN: x (B x 3 x S x S in [0,1]), keep (B x K int64 visible patches), target (like x).
    OUT: out (the reconstruction) and grad.NAME for every parameter, of the loss
         mean((out - target)^2).
  python ae.py bench --config JSON --mask-ratio R --batch B --size S --steps N --warmup W [--threads T]
    one training step (noisy images, random visible patches, squared error to the clean ones,
    backward) timed; prints one JSON line with train_img_s.
"""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then + fc2(gelu(fc1(norm2(x))))."""

    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, x):
        b, n, c = x.shape
        h = self.heads
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1) / math.sqrt(c // h)).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Part(nn.Module):
    pass


class AE(nn.Module):
    def __init__(self, cfg, side):
        super().__init__()
        self.p = cfg["patch"]
        self.residual = cfg.get("residual", False)
        self.g = side // self.p
        n, w, dw = self.g * self.g, cfg["width"], cfg["decoder_width"]
        pixels = self.p * self.p * 3
        self.encoder = Part()
        self.encoder.embed = nn.Linear(pixels, w)
        self.encoder.pos = nn.Parameter(torch.zeros(1, n, w))
        self.encoder.blocks = nn.ModuleList(
            Block(w, cfg["heads"], cfg["mlp_ratio"]) for _ in range(cfg["depth"]))
        self.encoder.norm = nn.LayerNorm(w, eps=1e-6)
        self.decoder = Part()
        self.decoder.embed = nn.Linear(w, dw)
        self.decoder.mask_token = nn.Parameter(torch.zeros(1, 1, dw))
        self.decoder.pos = nn.Parameter(torch.zeros(1, n, dw))
        self.decoder.blocks = nn.ModuleList(
            Block(dw, cfg["decoder_heads"], cfg["mlp_ratio"]) for _ in range(cfg["decoder_depth"]))
        self.decoder.norm = nn.LayerNorm(dw, eps=1e-6)
        self.decoder.head = nn.Linear(dw, pixels)

    def patchify(self, x):
        b, p, g = x.shape[0], self.p, self.g
        return x.view(b, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * 3)

    def unpatchify(self, t):
        b, p, g = t.shape[0], self.p, self.g
        return t.view(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, g * p, g * p)

    def forward(self, x, keep):
        e, d = self.encoder, self.decoder
        tokens = e.embed(self.patchify(x * 2 - 1)) + e.pos
        b, n, w = tokens.shape
        k = keep.shape[1]
        h = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(b, k, w))
        for block in e.blocks:
            h = block(h)
        h = d.embed(e.norm(h))
        dw = h.shape[2]
        # (under bf16 autocast h is bf16: the token follows it)
        full = d.mask_token.to(h.dtype).expand(b, n, dw).scatter(1, keep.unsqueeze(-1).expand(b, k, dw), h)
        y = full + d.pos
        for block in d.blocks:
            y = block(y)
        head = d.head(d.norm(y))
        pred = torch.tanh(head)
        if self.residual:
            # Visible patches: their input plus a correction; hidden ones predicted whole.
            seen = torch.zeros(b, n, 1).scatter(1, keep.unsqueeze(-1), 1.0)
            inp = self.patchify(x * 2 - 1)
            pred = seen * (inp + head).clamp(-1, 1) + (1 - seen) * pred
        return (self.unpatchify(pred) + 1) / 2


def bench(a):
    cfg = json.loads(a.config)
    torch.manual_seed(0)
    model = AE(cfg, a.size)
    n = (a.size // cfg["patch"]) ** 2
    visible = min(n, max(1, round(n * (1 - a.mask_ratio))))
    x = torch.rand(a.batch, 3, a.size, a.size)
    noisy = (x + torch.randn_like(x) * 0.25).clamp(0, 1)
    keep = torch.rand(a.batch, n).argsort(1)[:, :visible].sort(1).values

    def step():
        ((model(noisy, keep) - x) ** 2).mean().backward()

    for _ in range(a.warmup):
        step()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    secs = time.perf_counter() - t
    print(json.dumps({"train_img_s": a.batch * a.steps / secs}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["step", "bench"])
    ap.add_argument("--config", required=True)
    ap.add_argument("--weights")
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--mask-ratio", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    if a.cmd == "bench":
        torch.set_num_threads(a.threads)
        return bench(a)
    torch.set_num_threads(1)
    data = load_file(a.data)
    x, keep, target = data["x"], data["keep"], data["target"]
    model = AE(json.loads(a.config), x.shape[-1])
    state = load_file(a.weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"weights do not match: missing {missing}, unexpected {unexpected}")
    out = model(x, keep)
    ((out - target) ** 2).mean().backward()
    tensors = {"out": out.detach().contiguous()}
    for name, p in model.named_parameters():
        tensors["grad." + name] = p.grad.contiguous()
    save_file(tensors, a.out)


if __name__ == "__main__":
    main()
