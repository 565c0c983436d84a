"""One-token projections on the GPU: cuBLAS (`F.linear`) vs the Triton GEMV (streaming/kernels/gemv.py)
vs Inductor's reduction (`(x * W).sum(-1)` under torch.compile), on the TinyLlama-1.1B shapes.

Each path runs over `--layers` distinct copies of the weight, as a decode step does (one copy would
sit in the H200's 50 MB L2 and time the cache, not memory), captured in one CUDA graph, so launch
gaps count as they do in the step. GB/s = weight bytes read per call / time per call. Also checks each
path against F.linear in float32. Run on the GPU:

    PYTHONPATH=. python benchmarks/gemv.py [--sweep] [--fused-sweep] [--pdl]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from cache import pdl
from streaming.kernels import gemv as gemv_kernel

SHAPES = {  # name: (N, K) of the TinyLlama-1.1B projections, stacked as the step stacks them
    "qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632), "lm_head": (32000, 2048),
}


def time_graph(fn, weights, x, repeats: int = 20) -> float:
    """Seconds per call of fn(x, w), over every w in weights, replayed as one CUDA graph."""
    for w in weights[:2]:
        fn(x, w)  # compile / warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(x, w)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats / len(weights)


def reduction(x, w):
    return (x.float() * w.float()).sum(-1).to(x.dtype)


def _with_pdl(fn):
    def launch(x, w):
        pdl.FORCED = True
        try:
            return fn(x, w)
        finally:
            pdl.FORCED = False  # main() times everything else without

    return launch


def _fused(name: str, N: int, K: int, device, dtype):
    """The kernel as streaming/layer_gemv.py calls it for this projection (None: no extra work)."""
    ones = torch.ones(K, device=device, dtype=dtype)
    if name == "qkv":  # RMSNorm before, RoPE on the 2,048 query columns after
        cos = torch.rand(64, device=device, dtype=dtype)
        return lambda x, w, config=None: gemv_kernel.gemv(x, w, norm=(ones, 1e-5), rotate=(cos, cos, 2048), config=config)
    if name in ("o", "down"):
        residual = torch.randn(1, 1, N, device=device, dtype=dtype)
        return lambda x, w, config=None: gemv_kernel.gemv(x, w, residual=residual, config=config)
    if name == "gate_up":
        return lambda x, w, config=None: gemv_kernel.gemv(x, w, norm=(ones, 1e-5), swiglu=True, config=config)
    if name == "lm_head":
        return lambda x, w, config=None: gemv_kernel.gemv(x, w, norm=(ones, 1e-5), out_dtype=torch.float32, config=config)
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--sweep", action="store_true", help="time every kernel config, not only the default")
    parser.add_argument("--fused-sweep", action="store_true",
                        help="time kernel configs for the layer's fused kernels (norm/RoPE/residual/SwiGLU)")
    parser.add_argument("--inductor", action="store_true", help="also Inductor's reduction (compiles per shape)")
    parser.add_argument("--pdl", action="store_true", help="also time the kernels with programmatic dependent launch")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    pdl.FORCED = False  # plain launches unless a path says PDL
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16, {args.layers} weight copies per shape")
    print("| shape | N x K | path | us/call | GB/s | max err vs float32 |")
    print("|---|---|---|---|---|---|")
    compiled = torch.compile(reduction, fullgraph=True) if args.inductor else None
    for name in args.shapes.split(","):
        N, K = SHAPES[name]
        layers = args.layers if name != "lm_head" else 2
        weights = [torch.randn(N, K, device=device, dtype=dtype) * K**-0.5 for _ in range(layers)]
        x = torch.randn(1, 1, K, device=device, dtype=dtype)
        exact = F.linear(x.float(), weights[0].float())
        paths = {"cuBLAS F.linear": F.linear}
        configs = [gemv_kernel.default_config(K)]
        if args.sweep:
            configs = list(itertools.product((1, 2, 4, 8), (256, 512, 1024), (4, 8), (2, 3)))
        for config in configs:
            paths[f"triton {config}"] = lambda x, w, c=config: gemv_kernel.gemv(x, w, config=c)
        fused = _fused(name, N, K, device, dtype)
        if fused is not None:
            paths["triton, with the layer's norm/RoPE/residual/SwiGLU"] = fused
            if args.fused_sweep:
                for config in itertools.product((2, 4, 8), (512, 1024, 2048), (4, 8), (2, 3)):
                    swept = lambda x, w, c=config: fused(x, w, config=c)  # noqa: E731
                    paths[f"triton {config}, with the layer's work" + (", PDL" if args.pdl else "")] = (
                        _with_pdl(swept) if args.pdl else swept)  # one launch mode only: the sweep is long
        if compiled is not None:
            paths["inductor reduction"] = compiled
        if args.pdl:
            for path, fn in list(paths.items()):
                if path.startswith("triton") and not path.endswith(", PDL"):
                    paths[path + ", PDL"] = _with_pdl(fn)
        for path, fn in paths.items():
            try:
                out = fn(x, weights[0]).float()
                err = (out - exact).abs().max().item() if out.shape == exact.shape and "layer" not in path else float("nan")
                seconds = time_graph(fn, weights, x)
            except Exception as exc:  # a config past the shared-memory or register limit
                print(f"| {name} | {N} x {K} | {path} | failed: {type(exc).__name__} | | |")
                continue
            gbs = N * K * 2 / seconds / 1e9
            print(f"| {name} | {N} x {K} | {path} | {seconds * 1e6:.2f} | {gbs:,.0f} | {err:.2e} |", flush=True)


if __name__ == "__main__":
    main()
