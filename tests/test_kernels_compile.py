"""Every Triton kernel of the decode and prompt steps compiles for a Hopper GPU (sm_90), in every variant the step
launches, with and without programmatic dependent launch: ahead of time, to PTX, with no GPU present.

The GPU tests (tests/test_gemv.py, test_decode_kernel.py, test_store_kernel.py) check what the kernels
compute; they need the GPU machine. This catches a kernel that no longer compiles on any machine
with Triton, before a GPU run (CI included: the `test` extra brings Triton). Skipped where Triton is absent.
"""

import pytest
import torch

from cache import plan_kernel, store_kernel
from streaming.kernels import chunk_attention, decode_attention, gemv, greedy_step

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def _ptx(kernel, types: dict[str, str], constexprs: dict, **options) -> str:
    """PTX of `kernel` for sm_90: `types` gives each runtime argument's Triton type ("*bf16", "i32", ...)."""
    signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=HOPPER, options=options).asm["ptx"]


GEMV_TYPES = dict(X="*bf16", W="*bf16", Out="*bf16", NormW="*bf16", Res="*bf16", Cos="*bf16", Sin="*bf16",
                  N="i32", pairs="i32", stride_wn="i32", rotated="i32", eps="fp32")
GEMV_MODES = {  # as streaming/layer_gemv.py launches them
    "qkv": dict(NORM=True, ROTATE=True), "o": dict(RESIDUAL=True), "gate_up": dict(NORM=True, SWIGLU=True),
    "down": dict(RESIDUAL=True), "head": dict(NORM=True),
}


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("mode", sorted(GEMV_MODES))
def test_gemv_compiles(mode, pdl):
    K = 5632 if mode == "down" else 2048
    flags = dict(NORM=False, RESIDUAL=False, SWIGLU=False, ROTATE=False) | GEMV_MODES[mode]
    half_block, block_k, warps, stages = gemv.default_config(K, norm=flags["NORM"])
    ptx = _ptx(gemv._gemv_kernel, GEMV_TYPES,
               dict(K=K, HALF_BLOCK=half_block, BLOCK_K=block_k, HEAD_HALF=32, PDL=pdl, **flags),
               num_warps=warps, num_stages=stages, launch_pdl=pdl)
    assert ("griddepcontrol.wait" in ptx) == pdl


@pytest.mark.parametrize("store", [False, True])
@pytest.mark.parametrize("pdl", [False, True])
def test_decode_attention_and_join_compile(pdl, store):
    types = {name: "*bf16" for name in ("Q", "K", "V", "Cos", "Sin", "Out", "NewK", "NewV")}
    types |= dict(Rows="*i64", Total="*i64", Slots="*i64", MidAcc="*fp32", MidMax="*fp32", MidSum="*fp32",
                  scale="fp32")
    types |= {name: "i64" for name in decode_attention._decode_kernel.arg_names if name.startswith("stride")}
    ptx = _ptx(decode_attention._decode_kernel, types,
               dict(SINKS=4, WINDOW=2044, GROUP=8, GROUP_PAD=16, HALF=32, SPLITS=24, SPLIT_SLOTS=128, DIAG=True,
                    BLOCK_N=64, TENSOR_CORES=True, ROTATE=True, STORE=store, PDL=pdl),
               num_warps=4, num_stages=3, launch_pdl=pdl)
    assert ("griddepcontrol.wait" in ptx) == pdl
    ptx = _ptx(decode_attention._join_kernel,
               dict(MidAcc="*fp32", MidMax="*fp32", MidSum="*fp32", Out="*bf16", stride_ob="i32", stride_oh="i32"),
               dict(SPLITS=16, SPLITS_PAD=16, GROUP_PAD=16, D=64, PDL=pdl), num_warps=1, launch_pdl=pdl)
    assert ("griddepcontrol.wait" in ptx) == pdl


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("pdl", [False, True])
def test_store_kernel_compiles(pdl, log):
    types = dict(KBuf="*bf16", VBuf="*bf16", Rows="*i64", Slots="*i64", K="*bf16", V="*bf16", LogK="*bf16",
                 LogV="*bf16", n="i32")
    types |= {name: "i64" for name in store_kernel._store_kernel.arg_names if name.startswith(("stride", "sk", "sv"))}
    ptx = _ptx(store_kernel._store_kernel, types, dict(D=64, BLOCK_D=64, LOG=log, PDL=pdl), num_warps=1,
               launch_pdl=pdl)
    assert ("griddepcontrol.wait" in ptx) == pdl


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("programs", [8, 1000])  # a short chunk (64-row blocks) and a long one
def test_chunk_attention_compiles_within_shared_memory(dtype, head_dim, programs):
    """The chunk kernel's default configurations compile, and fit a Hopper program's shared memory
    (one that does not fails only at launch, on the GPU, with OutOfResources)."""
    kernel = chunk_attention._chunk_kernel
    types = {name: f"*{dtype}" for name in ("Q", "K", "V", "Cos", "Sin", "Out")}
    types |= dict(Rows="*i64", Total="*i64", QPos="*i64", n="i32", scale="fp32")
    types |= {name: "i64" for name in kernel.arg_names if name.startswith("stride")}
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    block_m, block_n, warps, stages = chunk_attention.default_config(torch_dtype, programs, 132)
    constexprs = dict(SINKS=4, WINDOW=2044, GROUP=8, D=head_dim, DIAG=True, BLOCK_M=block_m, BLOCK_N=block_n,
                      TENSOR_CORES=dtype != "fp32")
    signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=HOPPER,
                              options=dict(num_warps=warps, num_stages=stages))
    assert 0 < compiled.metadata.shared <= chunk_attention.SHARED_MEMORY


@pytest.mark.parametrize("counts", [False, True])
@pytest.mark.parametrize("by_row", [False, True])
def test_greedy_step_compiles(counts, by_row):
    kernel = greedy_step._greedy_kernel
    types = dict(Logits="*fp32", stride_l="i32", Rows="*i64", Out="*i64", Counters="*i64", Ring="*i32",
                 Head="*i64", Counts="*i16", Overwritten="*i32", vocab="i32")
    constexprs = dict(HISTORY=4096, BY_ROW=by_row, COUNTS=counts, KEEP=counts, BLOCK=greedy_step.MAX_BLOCK)
    assert "ld.global" in _ptx(kernel, types, constexprs, num_warps=8)


@pytest.mark.parametrize("has_rows", [False, True])
def test_decode_plan_compiles(has_rows):
    types = dict(Lengths="*i64", Rows="*i64", WriteSlots="*i64", Total="*i64", QueryPositions="*i64", batch="i32")
    constexprs = dict(SINKS=4, WINDOW=2044, HAS_ROWS=has_rows, BLOCK=plan_kernel.BLOCK)
    assert "st.global" in _ptx(plan_kernel._decode_plan_kernel, types, constexprs, num_warps=4)
