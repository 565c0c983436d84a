"""Where the Triton kernel tests run: on a CUDA GPU, or under Triton's interpreter on CPU
(TRITON_INTERPRET=1 with Triton installed; the `test` extra brings it on Linux x86-64). CI runs them a
second time under the interpreter (`.ci/run`); cases the interpreter cannot run (bf16) stay GPU only."""

from __future__ import annotations

import pytest
import torch

from cache.kernel_device import INTERPRETED  # noqa: F401 (tests import it from here)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def needs_triton(module) -> pytest.MarkDecorator:
    """Skip unless `module` imported Triton and a GPU or the interpreter can run its kernels."""
    return pytest.mark.skipif(module.triton is None or not (ON_GPU or INTERPRETED),
                              reason="GPU only (or TRITON_INTERPRET=1 with Triton installed): needs Triton and a CUDA GPU")
