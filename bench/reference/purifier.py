"""PyTorch twin of atop's GAN purifier (DeepFillv2-style generator, SN-PatchGAN discriminator),
for the agreement test and the purifier benchmark. Parameter names match atop's safetensors files.

The contextual attention here follows the reference implementations' formulation (per-image
convolutions with the normalised background patches, an identity-kernel convolution for the
fuse step, a transposed convolution to paste patches), whereas atop batches it as matrix
products: the agreement test checks that the two formulations give the same numbers.

Usage:
  python purifier.py forward --width C [LAYOUT] --weights G.safetensors --data IN.safetensors
         --out OUT.safetensors   (IN: image [-1,1], mask; OUT: x1, x2; with --disc D.safetensors also d)
  python purifier.py bench --width C [LAYOUT] --batch 32 --size 32 [--work-size P] [--sigma S]
         --steps 5 --warmup 2 [--threads N] [--channels-last 0|1]   (prints one JSON line with img/s)
  LAYOUT: [--no-attention] [--stages 1|2] [--skips 0|1] [--group-norm 0|1] [--residual 0|1]
"""
import argparse
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Layout:
    """The generator's options: the authors' layout by default."""

    def __init__(self, width, attention=True, stages=2, skips=False, norm=False, residual=False):
        self.c, self.attention, self.stages = width, attention, stages
        self.skips, self.norm, self.residual = skips, norm, residual


def groups(channels):
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class GatedConv(nn.Conv2d):
    """One conv to 2C channels: act(features) * sigmoid(gate), features optionally
    group-normalised first."""

    def __init__(self, cin, cout, k=3, stride=1, dilation=1, act="elu", norm=False):
        super().__init__(cin, 2 * cout, k, stride, dilation * (k - 1) // 2, dilation)
        self.out = cout
        self.act = F.elu if act == "elu" else F.relu
        self.norm = nn.GroupNorm(groups(cout), cout) if norm else None

    def forward(self, x):
        y = super().forward(x)
        feat, gate = torch.split(y, self.out, dim=1)
        if self.norm is not None:
            feat = self.norm(feat)
        return self.act(feat) * torch.sigmoid(gate)


def encoder(lay, cin, hidden):
    c, n = lay.c, lay.norm
    return {
        "conv1": GatedConv(cin, c // 2, 5, norm=n),
        "down1a": GatedConv(c // 2, hidden[0], 3, 2, norm=n),
        "down1b": GatedConv(hidden[0], c, norm=n),
        "down2a": GatedConv(c, hidden[1], 3, 2 if lay.stages == 2 else 1, norm=n),
        "down2b": GatedConv(hidden[1], 2 * c, norm=n),
    }


def decoder(lay):
    c, n = lay.c, lay.norm
    s1, s2 = (c, c // 2) if lay.skips else (0, 0)
    return {
        "up1a": GatedConv(2 * c + s1, c, norm=n),
        "up1b": GatedConv(c, c, norm=n),
        "up2a": GatedConv(c + s2, c // 2, norm=n),
        "up2b": GatedConv(c // 2, c // 4, norm=n),
        "to_rgb": nn.Conv2d(c // 4, 3, 3, 1, 1),
    }


def run(d, names, x):
    for n in names:
        x = d[n](x)
    return x


def encode(d, names, x, keep):
    """Runs an encoder and what follows it; keeps the full- and half-resolution features."""
    if not keep:
        return run(d, names, x), None
    full = d[names[0]](x)
    half = run(d, names[1:3], full)
    return run(d, names[3:], half), (full, half)


def decode(d, lay, x, skips, base):
    if lay.stages == 2:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
    if skips is not None:
        x = torch.cat([x, skips[1]], 1)
    x = d["up1b"](d["up1a"](x))
    x = F.interpolate(x, scale_factor=2, mode="nearest")
    if skips is not None:
        x = torch.cat([x, skips[0]], 1)
    x = d["up2b"](d["up2a"](x))
    rgb = d["to_rgb"](x)
    return (base + rgb).clamp(-1, 1) if lay.residual else torch.tanh(rgb)


ENC = ["conv1", "down1a", "down1b", "down2a", "down2b"]


def contextual_attention(f, mask):
    """Per image: match 3x3 half-resolution patches (normalised background patches as conv
    filters), fuse with identity kernels, masked softmax (scale 10), paste 4x4 patches with a
    transposed convolution."""
    n, c, h, w = f.shape
    hs, ws = h // 2, w // 2
    l = hs * ws
    eye = torch.eye(3, dtype=f.dtype).view(1, 1, 3, 3)
    outs = []
    for i in range(n):
        fi = f[i:i + 1]
        raw = F.unfold(fi, 4, padding=1, stride=2).view(c, 4, 4, l).permute(3, 0, 1, 2)
        small = fi[:, :, ::2, ::2]
        k = F.unfold(small, 3, padding=1).view(c, 3, 3, l).permute(3, 0, 1, 2)
        k = k / k.flatten(1).norm(dim=1).clamp_min(1e-4).view(l, 1, 1, 1)
        s = F.conv2d(small, k, padding=1)  # 1 x L x hs x ws
        s = F.conv2d(s.view(1, 1, l, l), eye, padding=1)
        s = s.view(1, hs, ws, hs, ws).permute(0, 2, 1, 4, 3).reshape(1, 1, l, l)
        s = F.conv2d(s, eye, padding=1)
        s = s.view(1, ws, hs, ws, hs).permute(0, 2, 1, 4, 3).reshape(1, l, hs, ws)
        step = mask.shape[2] // hs
        m = mask[i:i + 1, :, ::step, ::step]
        valid = (F.unfold(m, 3, padding=1).sum(1) == 0).to(f.dtype).view(1, l, 1, 1)
        a = torch.softmax(s * valid * 10, dim=1) * valid
        outs.append(F.conv_transpose2d(a, raw, stride=2, padding=1) / 4)
    return torch.cat(outs, 0)


class Generator(nn.Module):
    def __init__(self, lay):
        super().__init__()
        c, n = lay.c, lay.norm
        self.lay = lay
        coarse = encoder(lay, 5, (c, 2 * c))
        for i, d in enumerate([1, 2, 4, 8, 16, 1, 1]):
            coarse[f"bottleneck{i + 1}"] = GatedConv(2 * c, 2 * c, 3, 1, d, norm=n)
        coarse.update(decoder(lay))
        self.coarse = nn.ModuleDict(coarse)
        dilated = encoder(lay, 3, (c // 2, c))
        for i, d in enumerate([1, 2, 4, 8, 16]):
            dilated[f"bottleneck{i + 1}"] = GatedConv(2 * c, 2 * c, 3, 1, d, norm=n)
        fine = {"dilated": nn.ModuleDict(dilated)}
        if lay.attention:
            att = encoder(lay, 3, (c // 2, 2 * c))
            att["relu"] = GatedConv(2 * c, 2 * c, act="relu", norm=n)
            att["after1"] = GatedConv(2 * c, 2 * c, norm=n)
            att["after2"] = GatedConv(2 * c, 2 * c, norm=n)
            fine["attention"] = nn.ModuleDict(att)
        fine["merge1"] = GatedConv(4 * c if lay.attention else 2 * c, 2 * c, norm=n)
        fine["merge2"] = GatedConv(2 * c, 2 * c, norm=n)
        fine.update(decoder(lay))
        self.fine = nn.ModuleDict(fine)

    def forward(self, image, mask):
        lay = self.lay
        masked = image * (1 - mask)
        x = torch.cat([masked, torch.ones_like(mask), mask], 1)
        x, skips = encode(self.coarse, ENC + [f"bottleneck{i}" for i in range(1, 8)], x, lay.skips)
        x1 = decode(self.coarse, lay, x, skips, masked)
        fine_in = x1 * mask + masked
        a, skips = encode(self.fine["dilated"], ENC + [f"bottleneck{i}" for i in range(1, 6)],
                          fine_in, lay.skips)
        if lay.attention:
            att = self.fine["attention"]
            b = run(att, ENC + ["relu"], fine_in)
            b = att["after2"](att["after1"](contextual_attention(b, mask)))
            a = torch.cat([a, b], 1)
        x2 = decode(self.fine, lay, self.fine["merge2"](self.fine["merge1"](a)), skips, fine_in)
        return x1, x2


class SpectralConv(nn.Module):
    """torch.nn.utils.spectral_norm semantics with atop's parameter names."""

    def __init__(self, cin, cout, k=5, stride=2):
        super().__init__()
        self.weight_orig = nn.Parameter(torch.empty(cout, cin, k, k))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.register_buffer("weight_u", torch.zeros(cout))
        self.register_buffer("weight_v", torch.zeros(cin * k * k))
        self.stride, self.pad = stride, k // 2

    def forward(self, x):
        wm = self.weight_orig.flatten(1)
        if self.training:
            with torch.no_grad():
                self.weight_v.copy_(F.normalize(wm.t() @ self.weight_u, dim=0, eps=1e-12))
                self.weight_u.copy_(F.normalize(wm @ self.weight_v, dim=0, eps=1e-12))
        sigma = self.weight_u @ (wm @ self.weight_v)
        return F.conv2d(x, self.weight_orig / sigma, self.bias, self.stride, self.pad)


class Discriminator(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        ws = [4, width, 2 * width, 4 * width, 4 * width, 4 * width, 4 * width]
        for i in range(6):
            self.add_module(f"conv{i + 1}", SpectralConv(ws[i], ws[i + 1]))

    def forward(self, image, mask):
        x = torch.cat([image, mask], 1)
        for i in range(6):
            x = F.leaky_relu(getattr(self, f"conv{i + 1}")(x), 0.2)
        return x.flatten(1)


def load(module, path):
    from safetensors.torch import load_file
    state = load_file(path)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        sys.exit(f"{path} does not fit: missing {missing}, unexpected {unexpected}")


def layout(a):
    return Layout(a.width, not a.no_attention, a.stages, bool(a.skips), bool(a.group_norm),
                  bool(a.residual))


def forward(a):
    from safetensors.torch import load_file, save_file
    g = Generator(layout(a)).eval()
    load(g, a.weights)
    data = load_file(a.data)
    with torch.no_grad():
        x1, x2 = g(data["image"], data["mask"])
        out = {"x1": x1.contiguous(), "x2": x2.contiguous()}
        if a.disc:
            d = Discriminator(a.disc_width).eval()
            load(d, a.disc)
            out["d"] = d(x2, data["mask"]).contiguous()
    save_file(out, a.out)


def block_mask(n, side, grid=8, holes=16):
    """Block masks of the RT2 kind: `holes` of grid x grid blocks per image, 1 = hole."""
    blocks = torch.rand(n, grid * grid).argsort(1).argsort(1) < holes
    p = side // grid
    return (blocks.float().view(n, 1, grid, 1, grid, 1).expand(-1, -1, -1, p, -1, p)
            .reshape(n, 1, side, side))


def bench(a):
    """One generator training step on the resolution pipeline, as atop's trainer runs it:
    bilinear resize to the working size, Gaussian noise and an RT2 block mask drawn there, the
    generator, L1 of both outputs against the resized clean image, and the purified image
    averaged back to the input size (with an L1 term, so the backward passes through it)."""
    torch.manual_seed(0)
    g = Generator(layout(a))
    x = torch.rand(a.batch, 3, a.size, a.size)
    work = a.work_size or a.size
    if a.channels_last:
        g = g.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        clean = x if work == a.size else F.interpolate(x, size=(work, work), mode="bilinear",
                                                       align_corners=False)
        noisy = (clean + torch.randn_like(clean) * a.sigma).clamp(0, 1)
        mask = block_mask(a.batch, work, a.grid, a.holes)
        x1, x2 = g(noisy * 2 - 1, mask)
        target = clean * 2 - 1
        purified = ((x2 + 1) * 0.5).clamp(0, 1)
        if work != a.size:
            purified = F.adaptive_avg_pool2d(purified, (a.size, a.size))
        ((x1 - target).abs().mean() + (x2 - target).abs().mean()
         + (purified - x).abs().mean()).backward()

    for _ in range(a.warmup):
        step()
    t = time.time()
    for _ in range(a.steps):
        step()
    secs = time.time() - t
    print(json.dumps({"width": a.width, "batch": a.batch, "size": a.size, "work_size": work,
                      "steps": a.steps, "train_img_s": a.batch * a.steps / secs}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["forward", "bench"])
    p.add_argument("--width", type=int, default=48)
    p.add_argument("--no-attention", action="store_true")
    p.add_argument("--disc-width", type=int, default=64)
    p.add_argument("--weights")
    p.add_argument("--disc")
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--channels-last", type=int, default=0)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--skips", type=int, default=0)
    p.add_argument("--group-norm", type=int, default=0)
    p.add_argument("--residual", type=int, default=0)
    p.add_argument("--work-size", type=int, default=0)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--holes", type=int, default=16)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    forward(a) if a.mode == "forward" else bench(a)


if __name__ == "__main__":
    main()
