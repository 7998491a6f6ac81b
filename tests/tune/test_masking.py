"""ParameterMask: frozen entries never move (bit-exact) under Adam/AdamW/SGD with momentum and weight
decay built up before masking; trainable entries do move; counts and state round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fishertune.tune.masking import ParameterMask


class Tiny(nn.Module):
    def __init__(self, sparse: bool = False):
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=sparse)
        self.lin = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, idx):
        return self.head(torch.tanh(self.lin(self.emb(idx))))


def _step(model, opt, mask, gen, use_mask=True):
    idx = torch.randint(0, 10, (8,), generator=gen)
    y = torch.randint(0, 2, (8,), generator=gen)
    opt.zero_grad()
    nn.functional.cross_entropy(model(idx), y).backward()
    if use_mask:
        mask.apply_to_grads()
        mask.snapshot()
    opt.step()
    if use_mask:
        mask.restore()


def _random_masks(model, gen, p_keep=0.5):
    masks = {n: torch.rand(p.shape, generator=gen) < p_keep for n, p in model.named_parameters()}
    masks["head.bias"] = torch.zeros(2, dtype=torch.bool)      # one parameter frozen as a whole
    masks.pop("lin.bias")                                       # one left fully trainable
    return masks


OPTIMIZERS = {
    "adam_l2": lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.1),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adam_foreach": lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.1, foreach=True),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_frozen_entries_bit_exact_after_warmup_momentum(opt_name):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = Tiny()
    opt = OPTIMIZERS[opt_name](model.parameters())
    mask = ParameterMask(model)
    for _ in range(5):                         # warm-up: everything trains, momentum builds up
        _step(model, opt, mask, gen)
    masks = _random_masks(model, gen)
    mask.set(masks)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(10):
        _step(model, opt, mask, gen)
    for n, p in model.named_parameters():
        m = masks.get(n, torch.ones_like(p, dtype=torch.bool))
        assert torch.equal(p.detach()[~m], before[n][~m]), n              # bit-exact
        if m.any():
            assert not torch.equal(p.detach()[m], before[n][m]), n        # trainable entries moved


def test_without_restore_momentum_moves_frozen_entries():
    """The control that shows the test above can fail: zeroing gradients alone lets Adam move them."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.1)
    mask = ParameterMask(model)
    for _ in range(5):
        _step(model, opt, mask, gen)
    mask.set({"lin.weight": torch.zeros(3, 4, dtype=torch.bool).index_fill_(0, torch.tensor([0]), True)})
    before = model.lin.weight.detach().clone()
    for _ in range(3):
        idx = torch.randint(0, 10, (8,), generator=gen)
        y = torch.randint(0, 2, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(idx), y).backward()
        mask.apply_to_grads()
        opt.step()
    assert not torch.equal(model.lin.weight.detach()[1:], before[1:])


def test_sparse_embedding_gradients():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    model = Tiny(sparse=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mask = ParameterMask(model)
    for _ in range(3):
        _step(model, opt, mask, gen)
    rows = torch.zeros(10, 4, dtype=torch.bool)
    rows[:5] = True
    mask.set({"emb.weight": rows})
    before = model.emb.weight.detach().clone()
    for _ in range(5):
        _step(model, opt, mask, gen)
    assert torch.equal(model.emb.weight.detach()[5:], before[5:])
    assert not torch.equal(model.emb.weight.detach()[:5], before[:5])


def test_fully_frozen_parameter_gets_no_grad_and_no_state_change():
    model = Tiny()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    mask = ParameterMask(model, {"head.bias": torch.zeros(2, dtype=torch.bool)})
    gen = torch.Generator().manual_seed(0)
    _step(model, opt, mask, gen)
    assert model.head.bias.grad is None
    assert model.head.bias not in opt.state


def test_counts_ratio_and_state_round_trip():
    model = Tiny()
    masks = {"emb.weight": torch.zeros(10, 4, dtype=torch.bool), "lin.weight": torch.eye(3, 4, dtype=torch.bool)}
    mask = ParameterMask(model, masks)
    total = sum(p.numel() for p in model.parameters())
    counts = mask.active_count()
    assert counts["emb.weight"] == 0 and counts["lin.weight"] == 3 and counts["head.weight"] == 6
    assert mask.total_count()["emb.weight"] == 40
    assert mask.ratio() == pytest.approx((total - 40 - 12 + 3) / total)
    assert mask.active_tensors() == 4           # all but emb.weight
    other = ParameterMask(Tiny())
    other.load_state_dict(mask.state_dict())
    assert other.active_count() == counts
    for n in masks:
        assert torch.equal(other.mask(n), mask.mask(n))
    mask.set({})
    assert mask.ratio() == 1.0


def test_bad_masks_are_clear_errors():
    model = Tiny()
    with pytest.raises(ValueError, match="nope"):
        ParameterMask(model, {"nope": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        ParameterMask(model, {"lin.bias": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="boolean"):
        ParameterMask(model, {"lin.bias": torch.full((3,), 0.5)})
    m = ParameterMask(model, {"lin.bias": torch.tensor([1.0, 0.0, 1.0])})      # 0/1 accepted
    assert m.active_count()["lin.bias"] == 2


def test_special_values_survive_bit_exact():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-0.0, float("inf"), 1.0, 2.0]]))
    mask = ParameterMask(lin, {"weight": torch.tensor([[False, False, True, True]])})
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        lin.weight.grad = torch.ones(1, 4)
        mask.apply_to_grads()
        assert torch.equal(lin.weight.grad, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
        mask.snapshot()
        opt.step()
        mask.restore()
    w = lin.weight.detach()
    assert torch.signbit(w[0, 0]) and w[0, 0] == 0 and w[0, 1] == float("inf")
    assert w[0, 2] != 1.0 and w[0, 3] != 2.0
