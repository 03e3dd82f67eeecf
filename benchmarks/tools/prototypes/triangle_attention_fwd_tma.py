"""Prototype (not library code): the triangle attention forward with TMA tensor
descriptors, and optionally Triton's warp specialisation, timed against foldops's
pointer-based forward in one process.

Scope: bf16, no key mask, N a multiple of the blocks, contiguous q/k/v and bias. It
exists to decide whether the kernels should move to descriptors; see "Alternatives
measured and lost" in docs/kernels/triangle_attention.md.

    python benchmarks/tools/prototypes/triangle_attention_fwd_tma.py contiguous 512 1024

H100 (torch 2.11, Triton 3.6), B=1, H=4, D=32. The forward alone: TMA, 4 warps
against foldops, 128x64 tiles:

    N=512 0.428 vs 0.409 ms (128x32: 0.411)   N=768 1.233 vs 1.303   N=1024 2.873 vs 3.062
    (128x32: 2.823)   N=1536 9.141 vs 9.920   N=2048 21.18 vs 24.63

A rerun in one process, repeating each size, measured foldops 0.409 / 3.04-3.14 ms and
the prototype 0.411-0.413 / 3.00 ms at N=512 / 1024: within the noise, and so not the
gain the first run suggested. warp_specialize=True (8 warps) was slower at every size. The "start" layout run (q/k/v as views of one
projection) stopped on an illegal memory access at its first CUDA call and was not
investigated.
"""
import sys
import torch, triton, triton.language as tl
import triton.testing
from foldops.kernels import triangle_attention as K

LOG2E = 1.4426950408889634


@triton.jit
def _fwd_tma(Q, Kt, V, BIAS, OUT, LSE,
             sqb, sqi, sqn, sqh, sbb, sbh, sbj, I, N, H, scale,
             D: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, WS: tl.constexpr):
    pid_j = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    bh = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    row = b * sqb + i * sqi + h * sqh  # q/k/v/out share strides here
    q_desc = tl.make_tensor_descriptor(Q + row, shape=[N, D], strides=[sqn, 1], block_shape=[BLOCK_J, D])
    k_desc = tl.make_tensor_descriptor(Kt + row, shape=[N, D], strides=[sqn, 1], block_shape=[BLOCK_K, D])
    v_desc = tl.make_tensor_descriptor(V + row, shape=[N, D], strides=[sqn, 1], block_shape=[BLOCK_K, D])
    b_desc = tl.make_tensor_descriptor(BIAS + b * sbb + h * sbh, shape=[N, N], strides=[sbj, 1],
                                       block_shape=[BLOCK_J, BLOCK_K])
    j0 = pid_j * BLOCK_J
    q = q_desc.load([j0, 0])
    m_i = tl.full([BLOCK_J], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_J], dtype=tl.float32)
    acc = tl.zeros([BLOCK_J, D], dtype=tl.float32)
    for start_k in tl.range(0, N, BLOCK_K, warp_specialize=WS):
        k = k_desc.load([start_k, 0])
        v = v_desc.load([start_k, 0])
        bias = b_desc.load([j0, start_k])
        s = tl.dot(q, tl.trans(k)) * scale + bias.to(tl.float32)
        m_new = tl.maximum(m_i, tl.max(s, 1) * 1.4426950408889634)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s * 1.4426950408889634 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    out = acc / l_i[:, None]
    o_desc = tl.make_tensor_descriptor(OUT + row, shape=[N, D], strides=[sqn, 1], block_shape=[BLOCK_J, D])
    o_desc.store([j0, 0], out.to(OUT.dtype.element_ty))
    offs = j0 + tl.arange(0, BLOCK_J)
    tl.store(LSE + ((b * I + i) * H + h) * N + offs, m_i + tl.math.log2(l_i))


def run(q, k, v, bias, bj, bk, warps, stages, ws):
    B, I, N, H, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, I, H, N, device=q.device, dtype=torch.float32)
    _fwd_tma[(N // bj, I, B * H)](q, k, v, bias, out, lse, *q.stride()[:4], *bias.stride()[:3], I, N, H, D ** -0.5,
                                  D=D, BLOCK_J=bj, BLOCK_K=bk, WS=ws, num_warps=warps, num_stages=stages)
    return out, lse


def main() -> None:
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    layout = sys.argv[1] if len(sys.argv) > 1 else "contiguous"
    sizes = [int(x) for x in sys.argv[2:]] or [512, 1024]
    for n in sizes:
        if layout == "start":  # views of one [B, I, N, 4, H, D] projection, as the layers pass them
            q, k, v = torch.randn(1, n, n, 4, 4, 32, device="cuda", dtype=torch.bfloat16).unbind(3)[:3]
        else:
            q, k, v = (torch.randn(1, n, n, 4, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        bias = torch.randn(1, 4, n, n, device="cuda", dtype=torch.bfloat16)
        ref, ref_lse = K.triangle_attention_forward(q, k, v, bias, None, 32 ** -0.5)
        base = triton.testing.do_bench(lambda: K.triangle_attention_forward(q, k, v, bias, None, 32 ** -0.5), rep=200)
        print(f"{layout} N={n} foldops fwd {base:.3f} ms", flush=True)
        for cfg in [(128, 32, 4, 3, False), (128, 64, 4, 3, False), (128, 32, 4, 4, False), (128, 64, 8, 2, True)]:
            try:
                out, lse = run(q, k, v, bias, *cfg)
                err = (out.float() - ref.float()).abs().max().item()
                ms = triton.testing.do_bench(lambda: run(q, k, v, bias, *cfg), rep=200)
                print(f"{layout} N={n} tma {cfg}: {ms:.3f} ms  max|diff| {err:.2e}", flush=True)
            except Exception as exc:
                print(f"N={n} tma {cfg}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)


if __name__ == "__main__":
    main()
