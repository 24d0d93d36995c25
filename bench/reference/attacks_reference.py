"""Reference attacks (torchattacks) on atop's weights and images, for agreement tests and the
attack benchmark.

Loads an atop checkpoint (model.safetensors + model.json) into the PyTorch twin of its
architecture (models.py), reads images and labels from a safetensors file (x: N x 3 x H x W in
[0,1], y: N int64), runs one torchattacks attack in batches and prints one JSON line:
  {"attack", "n", "robust_accuracy", "correct": [0/1 per sample], "seconds", "img_per_s"}

Usage: python attacks_reference.py --model CKPT_DIR --data FILE
       --attack pgd|eot-pgd|apgd-ce|apgd-dlr|apgd-t|fab-t|square|cw|autoattack-standard
       [--norm Linf|L2] [--eps 0.0313] [--steps 20 (square: queries)] [--alpha 0.0078] [--random-start 0|1]
       [--c 1 (cw)] [--square-rescale 0|1] [--batch 256] [--seed 0] [--threads N] [--channels-last 0|1]
       [--noise SIGMA] [--eot K (apgd, eot-pgd: eot_iter)] [--draws R]

--noise puts Gaussian noise (per image and pixel, clamped to [0,1]) in front of the classifier,
a randomized defence; APGD then averages --eot gradient draws per step (torchattacks' eot_iter).
eot-pgd is plain EOT-PGD (torchattacks' EOTPGD: the gradients of --eot draws summed, a sign step
of --alpha, projection, the last iterate returned). --draws R scores every clean and adversarial
image by R fresh draws of the model and adds their predictions to the output ("clean_preds",
"adv_preds": per sample, R labels each).

autoattack-standard is AutoAttack's standard sequence at the original AutoAttack budgets (APGD-CE
and APGD-T 100 iterations, FAB-T 100 iterations over 9 targets, Square 5,000 queries without
the rescaled schedule), built from torchattacks' attacks with MultiAttack: torchattacks'
own AutoAttack class runs APGD and FAB with 10 iterations, which is not the reference budget.

--impl autoattack runs the original AutoAttack code (github.com/fra31/auto-attack, which has the
L1 versions torchattacks lacks) instead: it is not installed by the set-up (no network), so put
a checkout on PYTHONPATH. Attacks: apgd-ce, apgd-t, fab-t, square, autoattack-standard.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import build  # noqa: E402
import torchattacks  # noqa: E402


class Normalised(nn.Module):
    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        self.noise = 0.0
        self.channels_last = False
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x):
        if self.noise > 0:
            x = (x + torch.randn_like(x) * self.noise).clamp(0, 1)
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)


def load_model(ckpt, channels_last=False):
    with open(os.path.join(ckpt, "model.json")) as f:
        meta = json.load(f)
    net, _ = build(meta["arch"], meta["num_classes"])
    state = load_file(os.path.join(ckpt, "model.safetensors"))
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise SystemExit(f"weights do not fit {meta['arch']}: missing {missing}, unexpected {unexpected}")
    model = Normalised(net, meta["mean"], meta["std"]).eval()
    if channels_last:
        # The fastest CPU layout for convolutions, as atop uses: a fair speed comparison.
        model.net = model.net.to(memory_format=torch.channels_last)
        model.channels_last = True
    return model, meta["num_classes"]


def make_autoattack(a, model, classes):
    """The original AutoAttack's classes, at its own defaults for the standard version."""
    from autoattack import AutoAttack
    from autoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    from autoattack.fab_pt import FABAttack_PT
    from autoattack.square import SquareAttack
    dev = "cpu"
    if a.attack == "apgd-ce":
        atk = APGDAttack(model, norm=a.norm, eps=a.eps, n_iter=a.steps, n_restarts=1, loss="ce", seed=a.seed,
                         device=dev, use_largereps=bool(a.large_eps))
        return atk.perturb
    if a.attack == "apgd-t":
        atk = APGDAttack_targeted(model, norm=a.norm, eps=a.eps, n_iter=a.steps, n_restarts=1, seed=a.seed,
                                  device=dev, n_target_classes=min(9, classes - 1), use_largereps=bool(a.large_eps))
        return atk.perturb
    if a.attack == "fab-t":
        atk = FABAttack_PT(model, norm=a.norm, eps=a.eps, n_iter=a.steps, n_restarts=1, seed=a.seed, device=dev,
                           n_target_classes=min(9, classes - 1))
        atk.targeted = True
        return atk.perturb
    if a.attack == "square":
        atk = SquareAttack(model, norm=a.norm, eps=a.eps, n_queries=a.steps, n_restarts=1, p_init=0.8, seed=a.seed,
                           device=dev, resc_schedule=bool(a.square_rescale))
        return atk.perturb
    if a.attack == "autoattack-standard":
        atk = AutoAttack(model, norm=a.norm, eps=a.eps, version="standard", seed=a.seed, device=dev, verbose=False)
        return lambda x, y: atk.run_standard_evaluation(x, y, bs=len(x))
    raise SystemExit(f"--impl autoattack: no attack {a.attack}")


def make_attack(a, model, classes):
    if a.impl == "autoattack":
        return make_autoattack(a, model, classes)
    if a.attack == "pgd":
        if a.norm == "Linf":
            return torchattacks.PGD(model, eps=a.eps, alpha=a.alpha, steps=a.steps, random_start=bool(a.random_start))
        return torchattacks.PGDL2(model, eps=a.eps, alpha=a.alpha, steps=a.steps, random_start=bool(a.random_start))
    if a.attack == "eot-pgd":
        return torchattacks.EOTPGD(model, eps=a.eps, alpha=a.alpha, steps=a.steps, eot_iter=a.eot,
                                   random_start=bool(a.random_start))
    if a.attack in ("apgd-ce", "apgd-dlr"):
        return torchattacks.APGD(model, norm=a.norm, eps=a.eps, steps=a.steps, n_restarts=1, seed=a.seed,
                                 loss=a.attack.split("-")[1], eot_iter=a.eot, rho=0.75)
    if a.attack == "apgd-t":
        return torchattacks.APGDT(model, norm=a.norm, eps=a.eps, steps=a.steps, n_restarts=1, seed=a.seed,
                                  eot_iter=1, rho=0.75, n_classes=classes)
    if a.attack == "fab-t":
        return torchattacks.FAB(model, norm=a.norm, eps=a.eps, steps=a.steps, n_restarts=1, alpha_max=0.1, eta=1.05,
                                beta=0.9, seed=a.seed, multi_targeted=True, n_classes=classes)
    if a.attack == "square":
        return torchattacks.Square(model, norm=a.norm, eps=a.eps, n_queries=a.steps, n_restarts=1, p_init=0.8,
                                   loss="margin", resc_schedule=bool(a.square_rescale), seed=a.seed)
    if a.attack == "cw":
        return torchattacks.CW(model, c=a.c, kappa=0, steps=a.steps, lr=0.01)
    if a.attack == "autoattack-standard":
        return torchattacks.MultiAttack([
            torchattacks.APGD(model, norm=a.norm, eps=a.eps, steps=100, n_restarts=1, seed=a.seed, loss="ce",
                              eot_iter=1, rho=0.75),
            torchattacks.APGDT(model, norm=a.norm, eps=a.eps, steps=100, n_restarts=1, seed=a.seed, eot_iter=1,
                               rho=0.75, n_classes=classes),
            torchattacks.FAB(model, norm=a.norm, eps=a.eps, steps=100, n_restarts=1, alpha_max=0.1, eta=1.05,
                             beta=0.9, seed=a.seed, multi_targeted=True, n_classes=classes),
            torchattacks.Square(model, norm=a.norm, eps=a.eps, n_queries=5000, n_restarts=1, p_init=0.8,
                                loss="margin", resc_schedule=False, seed=a.seed),
        ])
    raise SystemExit(f"unknown attack {a.attack}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--attack", required=True)
    p.add_argument("--norm", default="Linf")
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--alpha", type=float, default=2 / 255)
    p.add_argument("--random-start", type=int, default=1)
    p.add_argument("--c", type=float, default=1.0)
    p.add_argument("--square-rescale", type=int, default=1)
    p.add_argument("--large-eps", type=int, default=0)
    p.add_argument("--impl", choices=["torchattacks", "autoattack"], default="torchattacks")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--channels-last", type=int, default=1)
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--eot", type=int, default=1)
    p.add_argument("--draws", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model, classes = load_model(a.model, bool(a.channels_last))
    model.noise = a.noise
    data = load_file(a.data)
    x, y = data["x"].float(), data["y"].long()
    attack = make_attack(a, model, classes)
    with torch.no_grad():
        # torchattacks' APGD attacks only the points one (noisy) draw classifies correctly:
        # the share it works on, for a fair reading of its speed on a random model.
        first_draw = (model(x).argmax(1) == y).float().mean().item()
    correct, clean_preds, adv_preds = [], [], []

    def draws(images):
        """R fresh draws of the model: per image, R predicted labels."""
        with torch.no_grad():
            return torch.stack([model(images).argmax(1) for _ in range(a.draws)], 1).tolist()

    start = time.time()
    for i in range(0, len(x), a.batch):
        xb, yb = x[i:i + a.batch], y[i:i + a.batch]
        adv = attack(xb, yb)
        with torch.no_grad():
            ok = model(adv).argmax(1) == yb
            if a.attack in ("fab-t", "cw", "autoattack-standard"):
                # Minimum-norm attacks may return points outside the budget: those do not count.
                delta = (adv - xb).flatten(1)
                size = {"Linf": delta.abs().amax(1), "L2": delta.norm(dim=1), "L1": delta.abs().sum(1)}[a.norm]
                ok |= size > a.eps * (1 + 1e-5) + 1e-6
            correct += ok.long().tolist()
        if a.draws > 0:
            clean_preds += draws(xb)
            adv_preds += draws(adv)
    secs = time.time() - start
    out = {"attack": a.attack, "n": len(x), "robust_accuracy": sum(correct) / max(len(x), 1),
           "correct": correct, "seconds": secs, "img_per_s": len(x) / secs,
           "first_draw_correct": first_draw}
    if a.draws > 0:
        out.update(clean_preds=clean_preds, adv_preds=adv_preds)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
