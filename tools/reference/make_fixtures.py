"""Generates the PyTorch golden fixtures dptrain's tests compare against.

Run (never in CI; torch is 5 GB):
    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy
    /tmp/torchvenv/bin/python tools/reference/make_fixtures.py
Writes tests/fixtures/fused_ops.json and tests/fixtures/optim.json (inputs and expected
outputs, float64 values printed from float32 computations unless stated).
"""
import json
import math
import os

import torch
import torch.nn.functional as F

torch.manual_seed(0)
OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures")


def t(x):
    return {"shape": list(x.shape), "data": [float(v) for v in x.detach().double().flatten().tolist()]}


def fused():
    cases = {}
    # layer norm with affine
    x = torch.randn(3, 16)
    w = torch.randn(16)
    b = torch.randn(16)
    cases["layer_norm"] = {"x": t(x), "w": t(w), "b": t(b), "y": t(F.layer_norm(x, (16,), w, b, 1e-5))}
    # GELU, both forms
    x = torch.linspace(-5, 5, 41)
    cases["gelu"] = {"x": t(x), "erf": t(F.gelu(x)), "tanh": t(F.gelu(x, approximate="tanh"))}
    # causal attention from a packed qkv [B, T, 3C], H heads
    B, T, C, H = 2, 7, 12, 3
    qkv = torch.randn(B, T, 3 * C)
    q, k, v = qkv.split(C, dim=2)
    sh = lambda z: z.view(B, T, H, C // H).transpose(1, 2)
    y = F.scaled_dot_product_attention(sh(q), sh(k), sh(v), is_causal=True)
    y = y.transpose(1, 2).contiguous().view(B, T, C)
    logits = (sh(q) @ sh(k).transpose(-2, -1)) / math.sqrt(C // H)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    max_logit = logits.masked_fill(~mask, float("-inf")).max()
    cases["attention"] = {"qkv": t(qkv), "heads": H, "y": t(y), "max_logit": float(max_logit)}
    # cross-entropy with z-loss (z-loss as in PaLM: coef * logsumexp^2, averaged)
    logits = torch.randn(5, 9) * 3
    tgt = torch.tensor([0, 8, 3, 3, 5])
    ce = F.cross_entropy(logits, tgt)
    lse = torch.logsumexp(logits, dim=-1)
    z = 1e-2
    cases["cross_entropy"] = {"logits": t(logits), "targets": tgt.tolist(), "z_coef": z, "loss": float(ce + z * (lse**2).mean()),
                              "log_z_mean": float(lse.mean()), "grad": t(torch.autograd.functional.jacobian(
                                  lambda l: F.cross_entropy(l, tgt) + z * (torch.logsumexp(l, -1) ** 2).mean(), logits))}
    # batch norm train (updates running stats) then eval
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(4))
        bn.bias.copy_(torch.randn(4))
    x = torch.randn(3, 4, 2, 5) * 2 + 1
    bn.train()
    y_train = bn(x)
    x2 = torch.randn(2, 4, 2, 5)
    bn.eval()
    y_eval = bn(x2)
    cases["batch_norm"] = {"x": t(x), "w": t(bn.weight), "b": t(bn.bias), "y_train": t(y_train), "running_mean": t(bn.running_mean),
                           "running_var": t(bn.running_var), "x_eval": t(x2), "y_eval": t(y_eval)}
    return cases


def optim():
    cases = {}
    p0 = torch.randn(10)
    grads = [torch.randn(10) for _ in range(5)]
    lrs = [0.1, 0.05, 0.02, 0.1, 0.07]

    def run(make):
        p = torch.nn.Parameter(p0.clone())
        opt = make([p])
        for g, lr in zip(grads, lrs):
            for group in opt.param_groups:
                group["lr"] = lr
            p.grad = g.clone()
            opt.step()
        return t(p)

    cases["p0"] = t(p0)
    cases["grads"] = [t(g) for g in grads]
    cases["lrs"] = lrs
    cases["sgd_momentum_wd"] = run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01))
    cases["sgd_nesterov"] = run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.8, nesterov=True))
    cases["sgd_plain"] = run(lambda ps: torch.optim.SGD(ps, lr=0.1))
    cases["adamw"] = run(lambda ps: torch.optim.AdamW(ps, lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1))
    cases["adamw_eps"] = run(lambda ps: torch.optim.AdamW(ps, lr=0.1, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.0))
    return cases


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    for name, fn in [("fused_ops", fused), ("optim", optim)]:
        with open(os.path.join(OUT, name + ".json"), "w") as f:
            json.dump(fn(), f)
        print("wrote", name, "torch", torch.__version__)
