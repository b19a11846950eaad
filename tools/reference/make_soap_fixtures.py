"""Generates the SOAP golden fixtures (tests/fixtures/soap.json) from PyPI pytorch-optimizer's
SOAP, the installable port of the authors' soap.py (see ../shared/notes/soap.md).

Run (never in CI; torch is 5 GB):
    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch pytorch-optimizer numpy
    /tmp/torchvenv/bin/python tools/reference/make_soap_fixtures.py

Each case: hyperparameters under the reference's names (as dptrain's [optim] keys), a parameter
of some shape, T gradients applied at a constant lr, and the parameter after every step
(float32 values, printed as the shortest decimals that round back to them). Cases whose factors are rank-deficient
(eigh may return any basis of a null space, and correct implementations then drift apart) also
carry the reference's full state after a few steps ("state"): the test loads it and compares the
replay of the remaining steps.
"""
import json
import os

import numpy as np
import torch
from pytorch_optimizer import SOAP

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "soap.json")


def flat(x):
    # The shortest decimal that rounds back to the same float32 (fixtures stay small).
    return [float(str(np.float32(v))) for v in x.detach().flatten().tolist()]


def run(name, shape, steps, hp, state_after=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randn(*shape, generator=g)
    grads = [torch.randn(*shape, generator=g) for _ in range(steps)]
    p = torch.nn.Parameter(p0.clone())
    opt = SOAP(
        [p],
        lr=hp["lr"],
        betas=tuple(hp["betas"]),
        shampoo_beta=None if hp["shampoo_beta"] < 0 else hp["shampoo_beta"],
        weight_decay=hp["weight_decay"],
        precondition_frequency=hp["precondition_frequency"],
        max_precondition_dim=hp["max_precond_dim"],
        merge_dims=hp["merge_dims"],
        precondition_1d=hp["precondition_1d"],
        correct_bias=hp["correct_bias"],
        normalize_gradient=hp["normalize_grads"],
        eps=hp["eps"],
    )
    after = []
    state = None
    for t, gr in enumerate(grads):
        if state_after is not None and t == state_after:
            st = opt.state[p]
            state = {
                "param": flat(p),
                "exp_avg": flat(st["exp_avg"]),
                "exp_avg_sq": flat(st["exp_avg_sq"]),
                "GG": [flat(m) if len(m) > 0 else None for m in st["GG"]],
                "Q": [flat(m) if len(m) > 0 else None for m in st["Q"]],
                # updates applied so far (the first call only initialises)
                "step": opt.param_groups[0]["step"] - 1,
            }
        p.grad = gr.clone()
        opt.step()
        after.append(flat(p))
    case = {
        "name": name,
        "shape": list(shape),
        "hp": hp,
        "p0": flat(p0),
        "grads": [flat(x) for x in grads],
        "after": after,
    }
    if state is not None:
        case["state_at"] = state_after
        case["state"] = state
    return case


def hp(**kw):
    base = dict(
        lr=3e-3,
        betas=[0.95, 0.95],
        shampoo_beta=-1.0,
        eps=1e-8,
        weight_decay=0.0,
        precondition_frequency=10,
        max_precond_dim=10000,
        merge_dims=False,
        precondition_1d=False,
        normalize_grads=False,
        correct_bias=True,
    )
    base.update(kw)
    return base


def main():
    torch.manual_seed(0)
    cases = [
        run("square f=3 wd", (6, 6), 20, hp(precondition_frequency=3, weight_decay=0.01, lr=1e-2), seed=1),
        run("f=1 shampoo_beta", (5, 5), 20, hp(precondition_frequency=1, shampoo_beta=0.9, betas=[0.9, 0.99]), seed=2),
        run("dim above max", (4, 20), 20, hp(max_precond_dim=16, precondition_frequency=4), seed=3),
        run("1-D adam path", (8,), 20, hp(weight_decay=0.01), seed=4),
        run("normalize no bias correction", (5, 5), 20, hp(normalize_grads=True, correct_bias=False, precondition_frequency=2), seed=5),
        run("merged 4-D (replay)", (4, 3, 3, 3), 20, hp(merge_dims=True, max_precond_dim=16, precondition_frequency=3), state_after=5, seed=6),
        run("rectangular (replay)", (4, 7), 20, hp(precondition_frequency=3), state_after=5, seed=7),
        run("precondition_1d (replay)", (6,), 20, hp(precondition_1d=True, precondition_frequency=3), state_after=5, seed=8),
    ]
    with open(OUT, "w") as f:
        json.dump({"generator": "pytorch-optimizer SOAP (torch %s)" % torch.__version__, "cases": cases}, f)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
