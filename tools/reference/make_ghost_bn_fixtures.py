"""Generates the Ghost Batch Normalization golden fixtures (tests/fixtures/ghost_bn.json) from
PyTorch: one `BatchNorm2d` / `BatchNorm1d` module applied to each ghost batch of the input in
turn (`torch.cat([bn(c) for c in x.split(ghost)])`, Hoffer et al.'s definition), so the running
statistics take one momentum update per ghost batch, in order.

Run (never in CI; torch is 5 GB):
    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy
    /tmp/torchvenv/bin/python tools/reference/make_ghost_bn_fixtures.py

Each case: the input shape, the ghost size, the affine parameters, then per training step the
input, the upstream gradient, the output, the gradients of input/weight/bias and the running
statistics after the step; finally an eval-mode input and output (running statistics).
"""
import json
import os

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "ghost_bn.json")


def flat(x):
    return [float(str(np.float32(v))) for v in x.detach().flatten().tolist()]


def case(name, shape, ghost, steps, seed):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    bn = torch.nn.BatchNorm2d(c) if len(shape) == 4 else torch.nn.BatchNorm1d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
    out = {"name": name, "shape": list(shape), "ghost": ghost, "weight": flat(bn.weight), "bias": flat(bn.bias), "steps": []}
    bn.train()
    for t in range(steps):
        # Different scales and offsets per step so the running statistics move visibly.
        x = (torch.randn(*shape, generator=g) * (1.0 + t) + 0.5 * t).requires_grad_(True)
        dy = torch.randn(*shape, generator=g)
        bn.zero_grad()
        y = torch.cat([bn(chunk) for chunk in x.split(ghost)])
        y.backward(dy)
        out["steps"].append({
            "x": flat(x), "dy": flat(dy), "y": flat(y), "dx": flat(x.grad), "dw": flat(bn.weight.grad), "db": flat(bn.bias.grad),
            "running_mean": flat(bn.running_mean), "running_var": flat(bn.running_var),
        })
    bn.eval()
    xe = torch.randn(*shape, generator=g)
    out["x_eval"] = flat(xe)
    out["y_eval"] = flat(bn(xe))
    return out


def main():
    cases = [
        case("2d, 4 ghost batches of 2", (8, 3, 2, 2), 2, 3, seed=1),
        case("1d, 3 ghost batches of 4", (12, 5), 4, 3, seed=2),
        case("2d, one ghost batch (plain batch norm)", (4, 3, 3, 3), 4, 2, seed=3),
    ]
    with open(OUT, "w") as f:
        json.dump({"generator": "torch %s BatchNorm over x.split(ghost)" % torch.__version__, "cases": cases}, f)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
