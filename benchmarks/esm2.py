"""ESM-2 encoder forward: foldops.models.esm.ESM2 against transformers' EsmModel, one process,
same weights (random), same padded token batches.

GPU case (issue 16's Performance section): the ESM-2 650M architecture (33 layers, 1280
wide, 20 heads), weights in bf16, 64 proteins of lengths 50-1022 (uniform, --seed),
residues drawn from the 20 standard amino acids, in padded batches of 8 (fair-esm's
batch converter layout, in the drawn order). Implementations:

- ``foldops``: ESM2 (packed tokens, varlen attention, auto backend: triton on cc >= 8.0);
- ``foldops_torch``: the same with the torch attention backend;
- ``foldops_last_maps``: attention probabilities of the last layer returned
  (``attn_layers=[33]``), the other layers on the fast op;
- ``hf_sdpa``: EsmModel with attn_implementation="sdpa" on the padded batches;
- ``hf_eager``: EsmModel with eager attention; ``hf_eager_maps``: the same with
  output_attentions=True (all layers' maps: transformers cannot ask for one layer).

CPU case: the 8M and 35M architectures, fp32, 16 proteins (same length law; --cpu-n).

Metrics per implementation: ms per pass over all batches (median of --repeats after a
warm-up pass; device events on GPU), tokens/s (tokens incl. BOS/EOS / time), and the
peak memory above the weights during one pass (CUDA allocator; on CPU the profiler's
allocator events). FLOPs per pass and the floor at --tflops are printed. Writes
``esm2.csv`` (tidy) into --out.

    python benchmarks/esm2.py --out benchmarks/results/h100          # GPU case
    python benchmarks/esm2.py --case cpu --out /tmp/esm2             # CPU case
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from foldops.bench.harness import Timer, measure_memory  # noqa: E402
from foldops.models.esm import ESM2, ESM2_CONFIGS  # noqa: E402
from foldops.models.esm_alphabet import Alphabet  # noqa: E402

AMINO = "ACDEFGHIKLMNPQRSTVWY"


def proteins(n: int, low: int, high: int, seed: int) -> List[str]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(low, high + 1, (n,), generator=g).tolist()
    return ["".join(AMINO[i] for i in torch.randint(0, 20, (length,), generator=g).tolist()) for length in lens]


def batches(seqs: List[str], size: int, device) -> List[torch.Tensor]:
    bc = Alphabet().get_batch_converter()
    return [bc(seqs[i: i + size])[2].to(device) for i in range(0, len(seqs), size)]


def flops(seqs: List[str], cfg) -> float:
    e, f, layers = cfg.embed_dim, cfg.ffn_dim, cfg.num_layers
    total = 0.0
    for s in seqs:
        n = len(s) + 2
        total += layers * (2 * n * (4 * e * e + 2 * e * f) + 4 * n * n * e)
    return total


def hf_models(name: str, device, dtype):
    from transformers import EsmConfig, EsmModel

    c = ESM2_CONFIGS[name]
    out = {}
    for impl in ("sdpa", "eager"):
        cfg = EsmConfig(vocab_size=33, hidden_size=c.embed_dim, num_hidden_layers=c.num_layers,
                        num_attention_heads=c.attention_heads, intermediate_size=c.ffn_dim,
                        position_embedding_type="rotary", token_dropout=True, mask_token_id=32, pad_token_id=1,
                        layer_norm_eps=1e-5, emb_layer_norm_before=False, max_position_embeddings=1026,
                        attn_implementation=impl)
        torch.manual_seed(0)
        with torch.device(device):
            out[impl] = EsmModel(cfg, add_pooling_layer=False).to(dtype).eval()
    out["eager"].load_state_dict(out["sdpa"].state_dict())
    return out


def build(name: str, device, dtype) -> Dict[str, object]:
    """{impl: fn(tokens)} with shared random weights."""
    runners = {}
    try:
        hf = hf_models(name, device, dtype)
    except ImportError:
        hf = None
        print("transformers not installed: foldops only")
    if hf is not None:
        model = ESM2.from_state_dict({k: v.float() for k, v in hf["sdpa"].state_dict().items()})
    else:
        torch.manual_seed(0)
        model = ESM2(name)
    model = model.to(device=device, dtype=dtype).eval()
    last = model.num_layers
    runners["foldops"] = lambda t: model(t)
    if device.type == "cuda":
        runners["foldops_torch"] = lambda t: model(t, backend="torch")
    runners["foldops_last_maps"] = lambda t: model(t, attn_layers=[last])
    if hf is not None:
        runners["hf_sdpa"] = lambda t: hf["sdpa"](t, attention_mask=t.ne(1).long())
        runners["hf_eager"] = lambda t: hf["eager"](t, attention_mask=t.ne(1).long())
        runners["hf_eager_maps"] = lambda t: hf["eager"](t, attention_mask=t.ne(1).long(), output_attentions=True)
    return runners


def run_case(case: str, names: List[str], n: int, device, dtype, args, writer, meta) -> None:
    seqs = proteins(n, 50, 1022, args.seed)
    toks = batches(seqs, args.batch, device)
    n_tokens = sum(len(s) + 2 for s in seqs)
    for name in names:
        cfg = ESM2_CONFIGS[name]
        work = flops(seqs, cfg)
        floor_ms = work / (args.tflops * 1e12) * 1e3 if device.type == "cuda" else None
        print(f"\n{case}: {name}, {n} proteins, {n_tokens} tokens, batches of {args.batch}, {dtype}; "
              f"{work / 1e12:.2f} TFLOP per pass" + (f", floor {floor_ms:.1f} ms at {args.tflops} TFLOP/s"
                                                     if floor_ms else ""))
        runners = build(name, device, dtype)
        timer = Timer(device)
        for impl, fn in runners.items():
            def one_pass(_=None, fn=fn):
                with torch.inference_mode():
                    for t in toks:
                        fn(t)
            try:
                times = timer.measure(one_pass, warmup=1, repeats=args.repeats, max_time_s=args.max_time,
                                      min_repeats=min(3, args.repeats))
                peak = measure_memory(device, one_pass)
            except torch.OutOfMemoryError:
                print(f"  {impl:18s} OOM")
                writer.writerow(dict(meta, case=case, model=name, impl=impl, metric="status", value="oom"))
                continue
            ms = statistics.median(times)
            rate = n_tokens / (ms / 1e3)
            print(f"  {impl:18s} {ms:9.1f} ms  {rate:10.0f} tokens/s  peak {peak if peak is None else round(peak)} MiB"
                  + (f"  ({floor_ms / ms:.0%} of floor)" if floor_ms else ""))
            for metric, value in (("ms_per_pass", ms), ("tokens_per_s", rate), ("peak_mib", peak),
                                  ("tokens", n_tokens), ("tflop_per_pass", work / 1e12), ("floor_ms", floor_ms)):
                writer.writerow(dict(meta, case=case, model=name, impl=impl, metric=metric, value=value))
        del runners
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=["auto", "gpu", "cpu"], default="auto")
    p.add_argument("--out", default="esm2-bench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--n", type=int, default=64, help="proteins in the GPU case")
    p.add_argument("--cpu-n", type=int, default=16, help="proteins in the CPU case")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--max-time", type=float, default=30.0, help="stop repeating after this many seconds")
    p.add_argument("--tflops", type=float, default=780.0, help="bf16 matmul ceiling for the floor (H100)")
    p.add_argument("--models", default=None, help="comma-separated ESM2_CONFIGS names")
    args = p.parse_args(argv)
    case = args.case
    if case == "auto":
        case = "gpu" if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = "none"
    if case == "gpu":
        device, dtype = torch.device("cuda"), torch.bfloat16
        names = (args.models or "esm2_t33_650M_UR50D").split(",")
        n = args.n
        device_name = torch.cuda.get_device_name()
    else:
        device, dtype = torch.device("cpu"), torch.float32
        names = (args.models or "esm2_t6_8M_UR50D,esm2_t12_35M_UR50D").split(",")
        n = args.cpu_n
        device_name = platform.processor() or platform.machine()
    meta = dict(device=device_name, torch=torch.__version__, transformers=tf_version, dtype=str(dtype).split(".")[-1],
                batch=args.batch, seed=args.seed)
    path = os.path.join(args.out, "esm2.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(meta) + ["case", "model", "impl", "metric", "value"])
        writer.writeheader()
        run_case(case, names, n, device, dtype, args, writer, meta)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
