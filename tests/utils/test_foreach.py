"""foreach_into: the fused path (fresh tensors) and the buffer path give the op's exact results."""

import pytest
import torch

from fishertune.utils.foreach import foreach_into, to_floats


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


def test_to_floats_keeps_order_and_values_of_mixed_shapes_and_dtypes():
    values = [torch.tensor(1.5), torch.tensor([2], dtype=torch.int64), torch.tensor([[-0.25]], dtype=torch.float16),
              torch.tensor(1e-30, dtype=torch.float64)]
    assert to_floats(values) == [1.5, 2.0, -0.25, 1e-30]
    assert to_floats([]) == []


def test_to_floats_rejects_tensors_with_more_than_one_element():
    with pytest.raises(RuntimeError):
        to_floats([torch.ones(2)])
