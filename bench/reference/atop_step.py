"""PyTorch reference of one AToP fine-tuning step (Eq. 9), for `atop bench atop`.

The same step as atop's trainer (src/train/atop/tuner.rs, FineTuner::step), written independently:
  1. x' by FGSM (one step of eps) or PGD-k (uniform random start, sign steps, projection) on the
     CE loss, against the frozen classifier alone or the whole defended model
     f(down(g(t(up(x))))) with EOT samples averaged per step (float32 like atop's attack, or
     bf16 autocast with --attack-bf16 1, atop's `adversary.precision`);
  2. the purifier's pass on x' under bf16 autocast when asked: bilinear resize to the working
     size, Gaussian noise and an RT2 block mask drawn there, the generator, the purified image
     area-averaged back to the classifier's size;
  3. with a GAN term, one hinge-loss step of the discriminator, then the live generator term;
  4. L_g = gan * -mean D(x2') + l1 * (|x1' - r| + |x2' - r|) + lambda * CE(y, f(purified)),
     backward through the frozen classifier (eval mode, no weight gradients), one Adam step.
With --ae CONFIG (the AE purifier's settings as JSON, as ae.py takes them) the purifier is the
AE instead: the encoder sees the patches outside the RT2 holes of the noisy image (the
transform's grid is the patch grid), the decoder reconstructs every patch, L_org is the L1 of
the reconstruction to the target on the [-1, 1] scale, and there is no discriminator.
Weights are random (timing only). Prints one JSON line with steps/s and img/s.

Usage: python atop_step.py --width C [LAYOUT] --classifier airnet-32-64-128 --batch B
       --attack fgsm|pgd --target classifier|defended --eps E --steps K --step-size S --eot T
       [--lam L] [--reconstruction clean|adversarial] [--gan-weight G] [--l1-weight W] [--lr LR] [--bf16 0|1] [--attack-bf16 0|1] [--work-size P]
       [--sigma S] [--disc-width 64] [--grid 8] [--holes 16] [--timed 3] [--warmup 1] [--threads N]
       [--ae CONFIG]
  LAYOUT: as purifier.py ([--no-attention] [--stages] [--skips] [--group-norm] [--residual])
"""
import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F

from ae import AE
from models import CIFAR_MEAN, CIFAR_STD, build
from purifier import Discriminator, Generator, Layout, block_mask


class Normalised(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--no-attention", action="store_true")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--skips", type=int, default=0)
    p.add_argument("--group-norm", type=int, default=0)
    p.add_argument("--residual", type=int, default=0)
    p.add_argument("--disc-width", type=int, default=64)
    p.add_argument("--classifier", default="airnet-32-64-128")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--work-size", type=int, default=0)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--holes", type=int, default=16)
    p.add_argument("--attack", choices=["fgsm", "pgd"], default="pgd")
    p.add_argument("--target", choices=["classifier", "defended"], default="defended")
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--step-size", type=float, default=0.0)
    p.add_argument("--eot", type=int, default=1)
    p.add_argument("--fraction", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--reconstruction", choices=["clean", "adversarial"], default="clean")
    p.add_argument("--gan-weight", type=float, default=1.0)
    p.add_argument("--l1-weight", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--bf16", type=int, default=0)
    p.add_argument("--attack-bf16", type=int, default=0)
    p.add_argument("--timed", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--ae", default="")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    work = a.work_size or a.size
    if a.ae:
        g, d = AE(json.loads(a.ae), work), None
    else:
        g = Generator(Layout(a.width, not a.no_attention, a.stages, bool(a.skips),
                             bool(a.group_norm), bool(a.residual)))
        d = Discriminator(a.disc_width)
    net, _ = build(a.classifier, 10)
    f = Normalised(net).eval()
    for q in f.parameters():
        q.requires_grad_(False)
    opt_g = torch.optim.Adam(g.parameters(), lr=a.lr, betas=(0.5, 0.999))
    opt_d = None if d is None else torch.optim.Adam(d.parameters(), lr=a.lr, betas=(0.5, 0.999))
    x = torch.rand(a.batch, 3, a.size, a.size)
    y = torch.randint(0, 10, (a.batch,))

    def autocast(on=None):
        if a.bf16 if on is None else on:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def purify(img):
        """(clean at the working size, x1, x2, mask, purified at the input size)."""
        clean = img if work == a.size else F.interpolate(
            img, size=(work, work), mode="bilinear", align_corners=False)
        noisy = (clean + torch.randn_like(clean) * a.sigma).clamp(0, 1)
        mask = block_mask(img.shape[0], work, a.grid, a.holes)
        if a.ae:
            # The patches outside the holes, in order (one mask pixel per patch).
            holes = mask[:, 0, ::g.p, ::g.p].reshape(img.shape[0], -1)
            keep = torch.sort(holes, dim=1, stable=True).indices[:, :holes.shape[1] - a.holes]
            out = g(noisy, keep)
            x1 = x2 = out * 2 - 1
            purified = out
        else:
            x1, x2 = g(noisy * 2 - 1, mask)
            purified = ((x2 + 1) * 0.5).clamp(0, 1)
        if work != a.size:
            purified = F.adaptive_avg_pool2d(purified, (a.size, a.size))
        return clean, x1, x2, mask, purified

    # x' for the first k images of the batch, the rest clean (the trainer's adversary.fraction).
    k = min(max(int(a.fraction * a.batch + 0.5), 1), a.batch)

    def adversarial():
        xa, ya = x[:k], y[:k]
        if a.attack == "fgsm":
            steps, size, start = 1, a.eps, False
        else:
            steps, size, start = a.steps, a.step_size or 2.5 * a.eps / a.steps, True
        model = f if a.target == "classifier" else (lambda z: f(purify(z)[4]))
        eot = 1 if a.target == "classifier" else a.eot
        adv = xa.clone()
        if start:
            adv = (xa + (torch.rand_like(xa) * 2 - 1) * a.eps).clamp(0, 1)
        for _ in range(steps):
            grad = torch.zeros_like(xa)
            for _ in range(eot):
                z = adv.detach().requires_grad_(True)
                with autocast(a.attack_bf16):
                    loss = F.cross_entropy(model(z), ya, reduction="sum")
                grad += torch.autograd.grad(loss, z)[0]
            adv = adv + grad.sign() * size
            adv = torch.min(torch.max(adv, xa - a.eps), xa + a.eps).clamp(0, 1).detach()
        return torch.cat([adv, x[k:]])

    def step():
        x_adv = adversarial()
        with autocast():
            clean, x1, x2, mask, purified = purify(x_adv)
        if a.reconstruction == "adversarial":
            target = clean
        elif work != a.size:
            target = F.interpolate(x, size=(work, work), mode="bilinear", align_corners=False)
        else:
            target = x
        target = target.float() * 2 - 1
        x1, x2 = x1.float(), x2.float()
        g_gan = torch.zeros(())
        if d is not None and a.gan_weight > 0:
            with autocast():
                s = d(torch.cat([target, x2.detach()]), torch.cat([mask, mask])).float()
            real, fake = s.chunk(2)
            d_loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
            for q in d.parameters():
                q.requires_grad_(False)
            with autocast():
                g_gan = -d(x2, mask).float().mean()
            for q in d.parameters():
                q.requires_grad_(True)
        if a.ae:
            g_l1 = (x2 - target).abs().mean()
        else:
            g_l1 = (x1 - target).abs().mean() + (x2 - target).abs().mean()
        with autocast():
            logits = f(purified.float()).float()
        ce = F.cross_entropy(logits, y)
        loss = a.gan_weight * g_gan + a.l1_weight * g_l1 + a.lam * ce
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()

    for _ in range(a.warmup):
        step()
    t = time.time()
    for _ in range(a.timed):
        step()
    secs = time.time() - t
    print(json.dumps({"batch": a.batch, "timed": a.timed, "steps_s": a.timed / secs,
                      "img_s": a.batch * a.timed / secs}))


if __name__ == "__main__":
    main()
