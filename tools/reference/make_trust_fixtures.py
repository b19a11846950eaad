"""Generates the LAMB and LARS golden fixtures (tests/fixtures/trust.json) from PyPI
pytorch-optimizer, with the settings of ../shared/notes/mup-probes-largebatch.md:
`Lamb(weight_decouple=False, adam_debias=True)` (coupled decay inside the direction, no bias
correction, weight norm clamped at 10, eps 1e-6) and `LARS` (trust ratio and decay on
parameters with more than one dimension only).

Run (never in CI; torch is 5 GB):
    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch pytorch-optimizer numpy
    /tmp/torchvenv/bin/python tools/reference/make_trust_fixtures.py

Each case: hyperparameters by dptrain's [optim] key names, several named parameters (the trust
ratio is per tensor, so a case needs more than one), T gradients applied at a constant lr, and
every parameter after every step (float32, shortest round-tripping decimals).
"""
import json
import os

import numpy as np
import torch
from pytorch_optimizer import LARS, Lamb

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "trust.json")


def flat(x):
    return [float(str(np.float32(v))) for v in x.detach().flatten().tolist()]


def make_opt(kind, params, hp):
    if kind == "lamb":
        return Lamb(
            params,
            lr=hp["lr"],
            betas=tuple(hp["betas"]),
            eps=hp["eps"],
            weight_decay=hp["weight_decay"],
            weight_decouple=False,
            adam_debias=True,
        )
    return LARS(
        params,
        lr=hp["lr"],
        weight_decay=hp["weight_decay"],
        momentum=hp["momentum"],
        nesterov=hp["nesterov"],
        trust_coefficient=hp["trust_coefficient"],
    )


def run(name, kind, shapes, steps, hp, seed, scale=None, zero=()):
    g = torch.Generator().manual_seed(seed)
    p0 = {}
    for n, s in shapes.items():
        x = torch.randn(*s, generator=g) * (scale or {}).get(n, 1.0)
        p0[n] = torch.zeros(*s) if n in zero else x
    grads = [{n: torch.randn(*s, generator=g) for n, s in shapes.items()} for _ in range(steps)]
    ps = {n: torch.nn.Parameter(p0[n].clone()) for n in shapes}
    opt = make_opt(kind, list(ps.values()), hp)
    after = []
    for gr in grads:
        for n, p in ps.items():
            p.grad = gr[n].clone()
        opt.step()
        after.append({n: flat(p) for n, p in ps.items()})
    return {
        "name": name,
        "kind": kind,
        "hp": hp,
        "shapes": {n: list(s) for n, s in shapes.items()},
        "p0": {n: flat(x) for n, x in p0.items()},
        "grads": [{n: flat(x) for n, x in gr.items()} for gr in grads],
        "after": after,
    }


def lamb(**kw):
    base = dict(lr=1e-2, betas=[0.9, 0.999], eps=1e-6, weight_decay=0.0, correct_bias=False)
    base.update(kw)
    return base


def lars(**kw):
    base = dict(lr=0.5, weight_decay=0.0, momentum=0.9, nesterov=False, trust_coefficient=0.02)
    base.update(kw)
    return base


def main():
    torch.manual_seed(0)
    shapes = {"w": (6, 5), "b": (5,), "conv": (3, 2, 2, 2)}
    cases = [
        run("lamb decay", "lamb", shapes, 20, lamb(weight_decay=0.01), seed=1),
        # ||w|| ≈ 5·sqrt(64) = 40 > 10: the clamp of the weight norm is active.
        run("lamb clamp", "lamb", {"w": (8, 8), "b": (8,)}, 20, lamb(betas=[0.9, 0.99]), seed=2, scale={"w": 5.0}),
        # A zero tensor: trust 1 on the first step.
        run("lamb zero tensor", "lamb", shapes, 20, lamb(weight_decay=0.1), seed=3, zero=("b",)),
        run("lars decay", "lars", shapes, 20, lars(weight_decay=0.01), seed=4),
        run("lars nesterov", "lars", shapes, 20, lars(nesterov=True, weight_decay=1e-4, trust_coefficient=1e-3, lr=5.0), seed=5),
        run("lars zero matrix", "lars", shapes, 20, lars(weight_decay=0.05, momentum=0.0), seed=6, zero=("w",)),
    ]
    with open(OUT, "w") as f:
        json.dump({"generator": "pytorch-optimizer Lamb/LARS (torch %s)" % torch.__version__, "cases": cases}, f)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
