"""The CUDA-graph decode step equals the eager step (runs only where a GPU is present)."""

import pytest
import torch

import streaming
from tests.tiny_checkpoint import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("kind", ["plain", "lckv"])
def test_graph_replay_matches_eager(tmp_path, kind):
    path = make_tiny_checkpoint(tmp_path / kind, kind, with_tokenizer=False)
    rt = streaming.load(path, device="cuda", dtype="float32")
    graphed = rt.session(sinks=2, window=24, chunk=8)
    rt.cuda_graphs = False
    eager = rt.session(sinks=2, window=24, chunk=8)
    assert graphed.use_cuda_graph and not eager.use_cuda_graph
    prompt = torch.randint(3, rt.config.vocab_size, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    for s in (graphed, eager):
        s.feed(prompt)
    steps = torch.randint(3, rt.config.vocab_size, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    for token in steps:  # 80 tokens through a 26-slot cache: many evictions
        a = graphed.feed([token], return_logits=True)
        b = eager.feed([token], return_logits=True)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert graphed._graph is not None
    for layer in rt.config.kv_layers:
        torch.testing.assert_close(graphed.cache.keys[layer], eager.cache.keys[layer])
        torch.testing.assert_close(graphed.cache.values[layer], eager.cache.values[layer])
    assert torch.equal(graphed.cache.lengths, eager.cache.lengths)
    assert graphed.stats() == eager.stats()
    # Generation through the graph equals eager generation.
    ids = [[r.token_ids for r in s.generate(max_new_tokens=20)] for s in (graphed, eager)]
    assert ids[0] == ids[1] and len(ids[0]) == 21  # 20 tokens + the final "length" response
