"""PyTorch eager side of benches/step: the same GPT-mini and MLP steps as dptrain's bench,
1 thread, f32, AdamW. Prints one JSON line per model: median step/fwd/bwd/opt in ms."""
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(1)
torch.manual_seed(0)
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 10


class Block(nn.Module):
    def __init__(s, c, h):
        super().__init__()
        s.h = h
        s.ln_1, s.ln_2 = nn.LayerNorm(c), nn.LayerNorm(c)
        s.c_attn, s.attn_proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        s.c_fc, s.mlp_proj = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(s, x):
        B, T, C = x.shape
        q, k, v = s.c_attn(s.ln_1(x)).split(C, dim=2)
        sh = lambda z: z.view(B, T, s.h, C // s.h).transpose(1, 2)
        q, k, v = sh(q), sh(k), sh(v)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // s.h)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        x = x + s.attn_proj(y)
        return x + s.mlp_proj(F.gelu(s.c_fc(s.ln_2(x))))


class Gpt(nn.Module):
    def __init__(s, v=256, t=128, c=128, l=4, h=4):
        super().__init__()
        s.wte, s.wpe = nn.Embedding(v, c), nn.Embedding(t, c)
        s.h = nn.ModuleList([Block(c, h) for _ in range(l)])
        s.ln_f, s.lm_head = nn.LayerNorm(c), nn.Linear(c, v, bias=False)

    def forward(s, idx, tgt):
        x = s.wte(idx) + s.wpe(torch.arange(idx.shape[1]))
        for b in s.h:
            x = b(x)
        logits = s.lm_head(s.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), tgt.view(-1))


def bench(name, model, make_batch):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    batch = make_batch()
    f, b, o, tot = [], [], [], []
    for i in range(STEPS + 2):
        t0 = time.perf_counter()
        loss = model(*batch)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i >= 2:
            f.append(t1 - t0); b.append(t2 - t1); o.append(t3 - t2); tot.append(t3 - t0)
    med = lambda xs: sorted(xs)[len(xs) // 2] * 1e3
    print(json.dumps({"model": name, "step_ms": med(tot), "fwd_ms": med(f), "bwd_ms": med(b), "opt_ms": med(o), "loss": float(loss)}))


class MlpLoss(nn.Module):
    def __init__(s):
        super().__init__()
        s.m = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))

    def forward(s, x, y):
        return F.cross_entropy(s.m(x), y)


bench("gpt-mini", Gpt(), lambda: (torch.randint(0, 256, (16, 128)), torch.randint(0, 256, (16, 128))))
bench("mlp", MlpLoss(), lambda: (torch.randn(256, 784), torch.randint(0, 10, (256,))))
