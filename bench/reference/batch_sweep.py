"""Forward + backward throughput of one network at several batch sizes, in PyTorch alone: how
large a stacked EOT pass can grow before it runs slower per image (docs/evaluation.md).

Usage: python batch_sweep.py [--arch airnet-32-64-128] [--batches 128 256 512 1024]
       [--noise 0.01] [--threads 2] [--images 2560]
Random weights, channels-last, eval mode, cross-entropy on the model's own predictions, the
gradient taken with respect to the input, as an attack step does. Prints one line per batch.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import build  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="airnet-32-64-128")
    p.add_argument("--batches", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=2560, help="images timed per batch size")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net, side = build(a.arch, 10)
    net = net.eval().to(memory_format=torch.channels_last)
    for b in a.batches:
        x = torch.rand(b, 3, side, side)

        def step():
            xg = x.clone().requires_grad_(True)
            z = (xg + torch.randn_like(xg) * a.noise).clamp(0, 1)
            out = net(z.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(out, out.argmax(1), reduction="sum")
            torch.autograd.grad(loss, [xg])

        step()  # warm-up
        reps = max(2, a.images // b)
        t = time.time()
        for _ in range(reps):
            step()
        print(f"batch {b}: {reps * b / (time.time() - t):.0f} img/s (forward + backward)", flush=True)


if __name__ == "__main__":
    main()
