"""PyTorch reference classifiers for atop's agreement tests.

Builds RobustBench's WideResNet layout (written out here: conv1, block{1,2,3}.layer.{i}.{bn1,
conv1,bn2,conv2,convShortcut}, bn1, fc) and torchvision's ResNets (the CIFAR variant swaps in a
3x3 stride-1 stem and drops the max-pool), gives every BatchNorm non-trivial running statistics,
and writes for each architecture:
  <out>/<arch>/weights.safetensors  the state dict (with PyTorch's num_batches_tracked)
  <out>/<arch>/io.safetensors       inputs x in [0,1] and the logits PyTorch computes for them
Normalisation (x - mean) / std is applied before the network, as atop does inside its models.

With --pt it also writes PyTorch checkpoints for `atop import`:
  <out>/<arch>/model.pt         torch.save(state_dict)
  <out>/<arch>/wrapped.pt       torch.save({"state_dict": {"module." + k: v}, "epoch": 5})
and <out>/evil.pt, a file whose unpickling would run `touch <out>/pwned` (it must be refused).

Usage: python models.py --out DIR [--arch wrn-16-4 resnet18 ...] [--classes 10] [--pt]
"""
import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


class WrnBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return (x if self.equal else self.convShortcut(a)) + out


class WrnGroup(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WrnBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, widen, classes):
        super().__init__()
        n = (depth - 4) // 6
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.block1 = WrnGroup(n, w[0], w[1], 1)
        self.block2 = WrnGroup(n, w[1], w[2], 2)
        self.block3 = WrnGroup(n, w[2], w[3], 2)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.fc = nn.Linear(w[3], classes)

    def forward(self, x):
        h = self.block3(self.block2(self.block1(self.conv1(x))))
        h = F.adaptive_avg_pool2d(F.relu(self.bn1(h)), 1).flatten(1)
        return self.fc(h)


class AirNorm(nn.Module):
    """BatchNorm without scale (fixed at 1), trainable bias, momentum 0.6, eps 1e-12."""

    def __init__(self, c):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, None, self.bias, self.training, 0.6, 1e-12)


class AirGroup(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm1 = AirNorm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = AirNorm(cout)

    def forward(self, x):
        h = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(h)))


class AirNet(nn.Module):
    """atop's airnet-W1-W2-W3 (same parameter names)."""

    def __init__(self, widths, classes):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, bias=False)
        cin, groups = 24, []
        for w in widths:
            groups.append(AirGroup(cin, w))
            cin = w
        self.group1, self.group2, self.group3 = groups
        self.head = nn.Linear(cin, classes, bias=False)

    def forward(self, x):
        h = F.gelu(self.whiten(x))
        h = self.group3(self.group2(self.group1(h)))
        return self.head(F.adaptive_max_pool2d(h, 1).flatten(1)) / 9.0


def build(arch, classes):
    if arch.startswith("airnet-"):
        widths = [int(w) for w in arch.split("-")[1:]]
        return AirNet(widths, classes), 32
    if arch.startswith("wrn-"):
        _, d, k = arch.split("-")
        return WideResNet(int(d), int(k), classes), 32
    imagenet = arch.endswith("-imagenet")
    depth = arch.removeprefix("resnet").removesuffix("-imagenet")
    net = getattr(torchvision.models, f"resnet{depth}")(num_classes=classes)
    if imagenet:
        return net, 64
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return net, 32


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--arch", nargs="+", default=["wrn-16-4", "wrn-28-10", "resnet18", "resnet34-imagenet", "resnet50-imagenet", "airnet-64-256-256"])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pt", action="store_true")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    for arch in args.arch:
        net, side = build(arch, args.classes)
        for m in net.modules():
            if isinstance(m, AirNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
        net.eval()
        x = torch.rand(4, 3, side, side)
        with torch.no_grad():
            logits = net((x - mean) / std)
        out = os.path.join(args.out, arch)
        os.makedirs(out, exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(out, "weights.safetensors"))
        save_file({"x": x, "logits": logits}, os.path.join(out, "io.safetensors"))
        if args.pt:
            sd = net.state_dict()
            torch.save(sd, os.path.join(out, "model.pt"))
            wrapped = {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 5}
            torch.save(wrapped, os.path.join(out, "wrapped.pt"))
        print(arch, tuple(logits.shape))
    if args.pt:
        marker = os.path.join(args.out, "pwned")

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        torch.save({"w": torch.zeros(2), "x": Evil()}, os.path.join(args.out, "evil.pt"))


if __name__ == "__main__":
    main()
