"""foreach_into: the fused path (fresh tensors) and the buffer path give the op's exact results."""

import pytest
import torch

from fishertune.utils.foreach import foreach_into


@pytest.mark.parametrize("op", ["sub", "mul"])
def test_fused_and_buffered_paths_equal_the_op(op):
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    b = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    want = [getattr(torch, op)(x, y) for x, y in zip(a, b)]
    fused = foreach_into(op, a, b)
    bufs = [torch.empty_like(x) for x in a]
    buffered = foreach_into(op, a, b, bufs)
    assert all(r is o for r, o in zip(buffered, bufs))
    for w, f, r in zip(want, fused, buffered):
        assert torch.equal(w, f) and torch.equal(w, r)
    ints = [x.view(torch.int32) for x in a]                 # the masks' use: bit patterns times 0/1 words
    words = [torch.randint(0, 2, x.shape, generator=g, dtype=torch.int32) for x in a]
    for w, f in zip([x * m for x, m in zip(ints, words)], foreach_into("mul", ints, words)):
        assert torch.equal(w, f)
