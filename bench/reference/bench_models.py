"""PyTorch side of `atop bench models`: the same architectures (models.py), batch and thread
count; prints one JSON line per architecture with inference and training images/s.

A training step = forward in train mode + cross-entropy + backward + SGD(momentum 0.9, wd 5e-4)
step, as atop's benchmark does. Inputs are normalised inside the timed region in both. On the CPU
the normalised input is put in channels-last layout, as atop does (PyTorch's fastest CPU path);
`--precision bf16` runs forward and loss under bf16 autocast, as atop's does.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from models import CIFAR_MEAN, CIFAR_STD, build  # noqa: E402


def timed(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", required=True)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    p.add_argument("--image-size", type=int, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net, side = build(args.arch, args.classes)
    side = args.image_size or side
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    x = torch.rand(args.batch, 3, side, side)
    y = torch.randint(0, args.classes, (args.batch,))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    bf16 = args.precision == "bf16"

    def forward():
        z = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        return net(z)

    def infer():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            forward()

    def train():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(), y)
        loss.backward()
        opt.step()

    net.eval()
    t_inf = timed(infer, args.warmup, args.steps)
    net.train()
    t_train = timed(train, args.warmup, args.steps)
    n = args.batch * args.steps
    print(json.dumps({"arch": args.arch, "precision": args.precision, "batch": args.batch, "threads": args.threads,
                      "infer_img_s": n / t_inf, "train_img_s": n / t_train}))


if __name__ == "__main__":
    main()
