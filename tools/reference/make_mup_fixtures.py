"""Generates the μP golden fixtures (tests/fixtures/mup.json) from PyPI `mup` 1.0.0: for a small
GPT and MLP — PyTorch mirrors with dptrain's parameter names and shapes — at two widths, every
parameter's init standard deviation (or constant) and its learning-rate and weight-decay
multipliers from `MuAdam` and `MuSGD`'s parameter groups, after `set_base_shapes` against the
same model at the base width.

Init values are read exactly, not estimated: `Tensor.uniform_` / `Tensor.normal_` are patched to
fill a tensor with the distribution's standard deviation, so what `mup` does to the init
(rescaling, `mup.init.normal_`'s 1/sqrt(width_mult)) is applied to that number.
- MLP: torch's default init (nn.Linear), then `set_base_shapes(..., rescale_params=True)` with a
  `MuReadout` head — mup's intended use for default-initialised models.
- GPT: nanoGPT's init (N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)), zero biases, unit
  LayerNorm gains) applied after `set_base_shapes` with `mup.init.normal_`, readout a
  `MuReadout` without bias (dptrain's GPT has an untied readout).

Run (never in CI):
    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy mup==1.0.0
    /tmp/torchvenv/bin/python tools/reference/make_mup_fixtures.py
"""
import json
import math
import os

import torch
import torch.nn as nn
import mup
from mup import MuAdam, MuReadout, MuSGD, set_base_shapes

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "mup.json")


def fill_uniform(self, a=0.0, b=1.0, generator=None):
    with torch.no_grad():
        return self.fill_((b - a) / math.sqrt(12.0))


def fill_normal(self, mean=0.0, std=1.0, generator=None):
    with torch.no_grad():
        return self.fill_(std)


torch.Tensor.uniform_ = fill_uniform
torch.Tensor.normal_ = fill_normal

GPT = dict(vocab=16, context=8, layers=2, heads=2, ratio=4)
MLP = dict(input_dim=64, classes=10, depth=2)


class Attn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_attn = nn.Linear(c, 3 * c)
        self.c_proj = nn.Linear(c, c)


class Mlp(nn.Module):
    def __init__(self, c, h):
        super().__init__()
        self.c_fc = nn.Linear(c, h)
        self.c_proj = nn.Linear(h, c)


class Block(nn.Module):
    def __init__(self, c, h):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c)
        self.attn = Attn(c)
        self.ln_2 = nn.LayerNorm(c)
        self.mlp = Mlp(c, h)


class Gpt(nn.Module):
    def __init__(self, c):
        super().__init__()
        g = GPT
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(g["vocab"], c),
            wpe=nn.Embedding(g["context"], c),
            h=nn.ModuleList([Block(c, g["ratio"] * c) for _ in range(g["layers"])]),
            ln_f=nn.LayerNorm(c),
        ))
        self.lm_head = MuReadout(c, g["vocab"], bias=False)

    def nanogpt_init(self):
        proj = 0.02 / math.sqrt(2 * GPT["layers"])
        for name, p in self.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                mup.init.normal_(p, std=proj if name.endswith("c_proj.weight") else 0.02)


class MlpNet(nn.Module):
    def __init__(self, w):
        super().__init__()
        m = MLP
        dims = [m["input_dim"]] + [w] * m["depth"]
        self.layers = nn.ModuleList([nn.Linear(dims[i], dims[i + 1]) for i in range(m["depth"])])
        self.head = MuReadout(w, m["classes"])


def describe(model):
    out = {}
    adam = MuAdam(model.parameters(), lr=1.0, weight_decay=1.0)
    sgd = MuSGD(model.parameters(), lr=1.0, weight_decay=1.0)
    groups = lambda opt: {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    ga, gs = groups(adam), groups(sgd)
    for name, p in model.named_parameters():
        v = p.detach().flatten()
        out[name] = {
            "shape": list(p.shape),
            # The fill value: the std of a random init, or the constant of a constant one.
            "init": float(v[0]) if len(v) else 0.0,
            "adam_lr": ga[id(p)][0], "adam_wd": ga[id(p)][1],
            "sgd_lr": gs[id(p)][0], "sgd_wd": gs[id(p)][1],
        }
    return out


def main():
    fx = {"generator": "mup %s, torch %s" % (getattr(mup, "__version__", "1.0.0"), torch.__version__), "gpt": {"base_width": 16, "config": GPT, "widths": {}},
          "mlp": {"base_width": 16, "config": MLP, "widths": {}}}
    for w in [32, 64]:
        model, base = Gpt(w), Gpt(16)
        set_base_shapes(model, base, rescale_params=False)
        model.nanogpt_init()
        fx["gpt"]["widths"][str(w)] = describe(model)
        model, base = MlpNet(w), MlpNet(16)
        set_base_shapes(model, base)  # rescales MuReadout and the Linear biases
        fx["mlp"]["widths"][str(w)] = describe(model)
    with open(OUT, "w") as f:
        json.dump(fx, f, indent=1)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
