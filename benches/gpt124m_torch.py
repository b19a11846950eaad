"""PyTorch side of `dptrain gpu-check` part (c): a GPT-124M-shaped model (GPT-2 small: 12
layers, 12 heads, width 768, context 1024, vocabulary 50304, biases, tanh GELU, untied readout,
batch 8) trained with fused AdamW under bf16 autocast on one GPU, the same shapes and batch
dptrain runs: the configuration a PyTorch user runs. `--small` is examples/shakespeare-char.toml's
model instead (nanoGPT's character-level one on bytes: 6 layers of 384, 6 heads, context 256,
vocabulary 256, no biases, exact GELU, dropout 0.2, batch 64, betas (0.9, 0.99)). Attention is
F.scaled_dot_product_attention (what eager nanoGPT uses); `--compile` wraps the model in
torch.compile (its compilation is in the warm-up steps, not the timed ones). Prints one line:
`tokens_per_s=<float> step_ms=<float> peak_mib=<float>` (peak: torch.cuda.max_memory_reserved),
and without --compile also `sdpa_fwd_ms=<float> sdpa_bwd_ms=<float>`: SDPA alone on the step's
attention shapes, all layers of one step (bf16, causal, the backend eager picks), timed with CUDA
events after the training steps, for comparing dptrain's flash kernels with PyTorch's.

usage: python3 benches/gpt124m_torch.py [batch] [steps] [warmup] [--compile] [--small]"""
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

COMPILE = "--compile" in sys.argv
SMALL = "--small" in sys.argv
ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
B = int(ARGS[0]) if len(ARGS) > 0 else (64 if SMALL else 8)
STEPS = int(ARGS[1]) if len(ARGS) > 1 else 10
WARMUP = int(ARGS[2]) if len(ARGS) > 2 else 3
if SMALL:
    V, T, C, L, H, BIAS, DROP, GELU, BETA2 = 256, 256, 384, 6, 6, False, 0.2, "none", 0.99
else:
    V, T, C, L, H, BIAS, DROP, GELU, BETA2 = 50304, 1024, 768, 12, 12, True, 0.0, "tanh", 0.95


class Block(nn.Module):
    def __init__(s):
        super().__init__()
        s.ln_1, s.ln_2 = nn.LayerNorm(C, bias=BIAS), nn.LayerNorm(C, bias=BIAS)
        s.c_attn, s.attn_proj = nn.Linear(C, 3 * C, bias=BIAS), nn.Linear(C, C, bias=BIAS)
        s.c_fc, s.mlp_proj = nn.Linear(C, 4 * C, bias=BIAS), nn.Linear(4 * C, C, bias=BIAS)
        s.drop = nn.Dropout(DROP)

    def forward(s, x):
        b, t, c = x.shape
        q, k, v = s.c_attn(s.ln_1(x)).split(c, dim=2)
        sh = lambda z: z.view(b, t, H, c // H).transpose(1, 2)
        y = F.scaled_dot_product_attention(sh(q), sh(k), sh(v), dropout_p=DROP if s.training else 0.0, is_causal=True)
        x = x + s.drop(s.attn_proj(y.transpose(1, 2).contiguous().view(b, t, c)))
        return x + s.drop(s.mlp_proj(F.gelu(s.c_fc(s.ln_2(x)), approximate=GELU)))


class GPT(nn.Module):
    def __init__(s):
        super().__init__()
        s.wte, s.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        s.h = nn.ModuleList(Block() for _ in range(L))
        s.ln_f, s.lm_head = nn.LayerNorm(C, bias=BIAS), nn.Linear(C, V, bias=False)
        s.drop = nn.Dropout(DROP)

    def forward(s, idx, tgt):
        x = s.drop(s.wte(idx) + s.wpe(torch.arange(idx.shape[1], device=idx.device)))
        for blk in s.h:
            x = blk(x)
        logits = s.lm_head(s.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, V), tgt.view(-1))


def sdpa_ms(dev, reps=10):
    """Forward and backward ms of F.scaled_dot_product_attention over L layers' worth of calls
    at this model's shapes (q, k, v strided as the model passes them: views of the qkv
    projection), each backward by autograd.grad: the kernels alone, no gradient accumulation."""
    qkv = torch.randn(B, T, 3 * C, device=dev, dtype=torch.bfloat16)
    sh = lambda z: z.view(B, T, H, C // H).transpose(1, 2)
    q, k, v = (sh(z).detach().requires_grad_() for z in qkv.split(C, dim=2))
    drop = DROP
    go = torch.randn(B, H, T, C // H, device=dev, dtype=torch.bfloat16)
    fwd = bwd = 0.0
    for i in range(reps + 1):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if dev.type == "cuda" else None
        t0 = time.perf_counter()
        if ev:
            ev[0].record()
        ys = [F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True) for _ in range(L)]
        if ev:
            ev[1].record()
        t1 = time.perf_counter()
        for y in ys:
            torch.autograd.grad(y, (q, k, v), go)
        if ev:
            ev[2].record()
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i > 0:  # the first is warm-up
            fwd += ev[0].elapsed_time(ev[1]) if ev else (t1 - t0) * 1e3
            bwd += ev[1].elapsed_time(ev[2]) if ev else (t2 - t1) * 1e3
    return fwd / reps, bwd / reps


def main():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = GPT().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, BETA2), weight_decay=0.1, fused=True)
    run = torch.compile(model) if COMPILE else model
    idx = torch.randint(0, V, (B, T), device=dev)
    tgt = torch.randint(0, V, (B, T), device=dev)
    for i in range(WARMUP + STEPS):
        if i == WARMUP:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = run(idx, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / STEPS
    peak = torch.cuda.max_memory_reserved() / 2**20
    line = f"tokens_per_s={B * T / dt:.1f} step_ms={dt * 1e3:.2f} peak_mib={peak:.0f}"
    if not COMPILE:
        del model, run, opt
        fwd, bwd = sdpa_ms(dev)
        line += f" sdpa_fwd_ms={fwd:.3f} sdpa_bwd_ms={bwd:.3f}"
    print(line)


if __name__ == "__main__":
    main()
