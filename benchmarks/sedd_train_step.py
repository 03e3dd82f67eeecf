"""SEDD training step on mixed-length protein batches: foldops varlen vs a padded batch with SDPA.

    python benchmarks/sedd_train_step.py                          # GPU: hidden 768, 12 heads, 12 blocks
    python benchmarks/sedd_train_step.py --out benchmarks/results/h100/sedd_train_step.csv
    python benchmarks/sedd_train_step.py --hidden 64 --heads 4 --blocks 2 --seqs 8 --max-len 128 --repeats 3   # CPU smoke

One process, one model (``foldops.models.SEDD``, the same weights for every variant), one
batch: ``--seqs`` sequences with protein-like lengths (log-normal around 300, clipped to
[50, 1022], fixed seed), padded to the longest. A training step is forward, a
cross-entropy loss on the real positions, backward and an AdamW step. Variants:

- ``foldops_varlen``: ``model(tokens, sigma, seqlens=...)``: unpadded once, every layer on
  the real tokens only, ``foldops.ops.varlen_attention`` (backend ``auto``).
- ``padded_sdpa``: the same modules on the padded ``[B, Lmax]`` batch, attention by
  ``scaled_dot_product_attention`` with a key-padding mask (what a user without
  flash_attn runs): linear layers and attention pay for the padding.
- ``padded_sdpa_mem_efficient`` (``--mem-efficient``): the same with SDPA forced to its
  memory-efficient kernel (what V100-class GPUs use).

``--compile`` compiles each block of both variants (the pointwise steps fuse; the first
warm-up steps include compilation). ``--checkpointing`` turns on activation checkpointing.

Metrics per variant: median step time over ``--repeats`` timed steps after ``--warmup``
(device events on CUDA, ``perf_counter`` elsewhere), real tokens per second, peak memory
(CUDA), and the ratio of tokens/s to ``padded_sdpa``. The issue's target on H100: varlen at
least 1.5x the padded SDPA tokens/s. Bound per step, printed: model FLOPs on the real tokens
(6 x params x tokens for the matmuls plus attention 4 x sum(L^2) x hidden x 3 for fwd+bwd)
over the bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import foldops
from foldops import device as fdevice
from foldops.models.sedd import SEDD, _Packing, bias_dropout_add_scale, modulate_fused, _rotate_qk

BF16_PEAK = {"H100": 780e12, "H200": 780e12, "A100": 312e12}  # dense bf16 matmul FLOP/s measured/spec


def protein_lengths(n: int, lo: int = 50, hi: int = 1022, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(300.0) + 0.6 * torch.randn(n, generator=g)).round().long()
    return lengths.clamp(lo, hi)


def _padded_block(block, x, c, cos, sin, attn_mask, pack, sdpa_context):
    batch, length, dim = x.shape
    mods = pack.rows(block.adaLN_modulation(c)).chunk(6, dim=-1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
    h = modulate_fused(block.norm1(x), shift_msa, scale_msa)
    heads = block.n_heads
    qkv = block.attn_qkv(h).unflatten(-1, (3, heads, dim // heads))
    qkv = _rotate_qk(qkv, cos[:, None, None, :], sin[:, None, None, :])
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, D]
    with sdpa_context():
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    a = a.transpose(1, 2).reshape(batch, length, dim)
    x = bias_dropout_add_scale(block.attn_out(a), None, gate_msa, x, block.dropout, block.training)
    h = block.mlp(modulate_fused(block.norm2(x), shift_mlp, scale_mlp))
    return bias_dropout_add_scale(h, None, gate_mlp, x, block.dropout, block.training)


def padded_forward(model: SEDD, tokens: torch.Tensor, sigma: torch.Tensor, keep: torch.Tensor,
                   sdpa_context=contextlib.nullcontext, block_fn=_padded_block) -> torch.Tensor:
    """The SEDD forward on the padded batch, attention by SDPA with a key mask [B, 1, 1, L]."""
    batch, length = tokens.shape
    pack = _Packing(batch, length, None, tokens.device)
    x = model.vocab_embed(tokens)
    c = F.silu(model.sigma_map(sigma))
    cos, sin = model.rotary_emb.cos_sin(pack.positions)
    attn_mask = keep[:, None, None, :]
    with model._autocast(x):
        for block in model.blocks:
            if model.activation_checkpointing and model.training and torch.is_grad_enabled():
                x = checkpoint(block_fn, block, x, c, cos, sin, attn_mask, pack, sdpa_context, use_reentrant=False)
            else:
                x = block_fn(block, x, c, cos, sin, attn_mask, pack, sdpa_context)
        x = model.output_layer._forward_packed(x, c, pack)
    if model.scale_by_sigma:
        esigm1_log = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1).log().to(x.dtype)
        x = x - esigm1_log[:, None, None] - math.log(x.shape[-1] - 1)
    return torch.scatter(x, -1, tokens[..., None], torch.zeros_like(x[..., :1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--cond", type=int, default=128)
    p.add_argument("--tokens", type=int, default=25, help="vocabulary (amino acids + specials)")
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--max-len", type=int, default=1022)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--mem-efficient", action="store_true", help="also run SDPA forced to its memory-efficient kernel")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in every variant")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each block (both variants) after the equality check")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="CSV path (default: print only)")
    args = p.parse_args(argv)

    dev = fdevice.resolve_device(args.device)
    amp = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.amp]
    torch.manual_seed(0)
    config = {"tokens": args.tokens, "graph": {"type": "absorb"},
              "model": {"hidden_size": args.hidden, "n_heads": args.heads, "n_blocks": args.blocks,
                        "cond_dim": args.cond, "dropout": 0.1, "scale_by_sigma": True}}
    model = SEDD(config, amp_dtype=amp, activation_checkpointing=args.checkpointing).to(dev)
    with torch.no_grad():  # the original zero-initialises the output layer and adaLN; give them weights
        for name, prm in model.named_parameters():
            if "adaLN" in name or "output_layer.linear" in name:
                prm.normal_(0, 0.02)
    lengths = protein_lengths(args.seqs, hi=args.max_len).to(dev)
    length = int(lengths.max())
    tokens = torch.randint(0, args.tokens + 1, (args.seqs, length), device=dev)
    keep = torch.arange(length, device=dev)[None, :] < lengths[:, None]
    sigma = torch.rand(args.seqs, device=dev) * 5
    real = int(lengths.sum())
    targets = tokens[keep]
    params = sum(p.numel() for p in model.parameters())
    attn_flops = 3 * 4 * float((lengths.double() ** 2).sum()) * args.hidden * args.blocks
    flops = 6 * params * real + attn_flops
    name = fdevice.device_name(dev)
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    print(f"device {name}; {args.seqs} sequences, {real} tokens (padded {args.seqs * length}, "
          f"{args.seqs * length / real:.2f}x); params {params / 1e6:.1f} M; step FLOPs {flops / 1e12:.2f} T"
          + (f", floor {flops / peak * 1e3:.2f} ms at {peak / 1e12:.0f} TFLOP/s" if peak else ""))

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step_varlen():
        logits = model(tokens, sigma, seqlens=lengths)
        loss = F.cross_entropy(logits[keep].float(), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def padded(ctx):
        def step():
            logits = padded_forward(model, tokens, sigma, keep, ctx, block_fn)
            loss = F.cross_entropy(logits[keep].float(), targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    variants = [("foldops_varlen", step_varlen), ("padded_sdpa", padded(contextlib.nullcontext))]
    if args.mem_efficient and dev.type != "cuda":
        print("--mem-efficient: SDPA's memory-efficient kernel runs on CUDA only; skipped")
    elif args.mem_efficient:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        variants.append(("padded_sdpa_mem_efficient",
                         padded(lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]))))

    model.eval()
    with torch.no_grad():  # the two forms compute the same logits at the real positions
        a = model(tokens, sigma, seqlens=lengths)[keep].float()
        b = padded_forward(model, tokens, sigma, keep)[keep].float()
        print(f"max |varlen - padded| logits at real positions: {(a - b).abs().max().item():.3e} "
              f"(scale {b.abs().max().item():.2e})")
        del a, b
    block_fn = _padded_block
    if args.compile:
        block_fn = torch.compile(_padded_block)
        for block in model.blocks:
            block._forward_packed = torch.compile(block._forward_packed)
    model.train()
    rows, results = [], {}
    for vname, step in variants:
        try:
            for _ in range(args.warmup):
                step()
            fdevice.synchronize(dev)
            fdevice.reset_peak_memory(dev)
            times = []
            for _ in range(args.repeats):
                if dev.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    step()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) / 1e3)
                else:
                    t0 = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            peak_mem = fdevice.peak_memory_bytes(dev)
            results[vname] = med
            status = "ok"
        except Exception as exc:  # OOM and friends are results, recorded as such
            if not fdevice.is_out_of_memory(exc):
                raise
            med, peak_mem, status = float("nan"), None, "oom"
            opt.zero_grad(set_to_none=True)
            fdevice.empty_cache(dev)
        tps = real / med if med == med else float("nan")
        print(f"{vname:28s} {status:4s} step {med * 1e3:9.2f} ms  {tps:12.0f} tokens/s  "
              f"peak {peak_mem / 2**30 if peak_mem else float('nan'):6.2f} GiB")
        for metric, value in (("step_ms", med * 1e3), ("tokens_per_s", tps),
                              ("peak_gib", peak_mem / 2**30 if peak_mem else float("nan"))):
            rows.append({"benchmark": "sedd_train_step", "variant": vname, "hidden": args.hidden,
                         "heads": args.heads, "blocks": args.blocks, "seqs": args.seqs, "tokens": real,
                         "padded_tokens": args.seqs * length, "amp": args.amp, "compile": args.compile,
                         "status": status,
                         "metric": metric, "value": value, "device": name, "torch": torch.__version__,
                         "foldops": foldops.__version__})
    if "padded_sdpa" in results and "foldops_varlen" in results:
        ratio = results["padded_sdpa"] / results["foldops_varlen"]
        print(f"foldops_varlen tokens/s = {ratio:.2f}x padded_sdpa (target >= 1.5x on H100)")
        rows.append({**rows[0], "variant": "foldops_varlen", "metric": "speedup_vs_padded_sdpa", "value": ratio,
                     "status": "ok"})
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {path} ({platform.node()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
