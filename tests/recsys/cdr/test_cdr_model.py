"""The model: shapes, aggregators, the contrastive loss on hand-made values, perturbation invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fishertune.recsys.cdr.batches import CDRBatch
from fishertune.recsys.cdr.config import CDRModelConfig
from fishertune.recsys.cdr.model import (
    Aggregator,
    BilinearCritic,
    UniCDR,
    contrastive_loss,
    rec_loss,
)
from fishertune.recsys.cdr.perturb import EdgeDropout, PopularityReweighting


def _batch(n_items=(7, 5), B=4, L=3, seed=0, train=True) -> CDRBatch:
    g = torch.Generator().manual_seed(seed)
    own = torch.randint(0, n_items[0] + 1, (B, L), generator=g)  # n_items[0] is padding
    shared = tuple(torch.randint(0, n + 1, (B, L), generator=g) for n in n_items)
    kw = {}
    if train:
        kw = {"pos": torch.randint(0, n_items[0], (B,), generator=g),
              "neg": torch.randint(0, n_items[0], (B, 2), generator=g)}
    return CDRBatch(0, torch.arange(B), own, shared, **kw)


@pytest.mark.parametrize("aggregator", ["mean", "user_attention"])
@pytest.mark.parametrize("contrastive", ["bilinear", "infonce", "none"])
def test_forward_shapes(aggregator, contrastive):
    torch.manual_seed(0)
    cfg = CDRModelConfig(dim=6, aggregator=aggregator, contrastive=contrastive)
    model = UniCDR(cfg, 4, ("a", "b"), (7, 5))
    b = _batch()
    terms = model.loss_terms(b, shift=1)
    assert terms["loss"].shape == () and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert model.item_emb["a"].weight.grad[7].abs().sum() == 0  # padding row gets nothing
    model.eval()
    assert model.score_all(_batch(train=False)).shape == (4, 7)
    groups = model.parameter_groups()
    import fnmatch
    for name, _ in model.named_parameters():
        hits = [g for g, pats in groups.items() if any(fnmatch.fnmatchcase(name, p) for p in pats)]
        assert len(hits) == 1, name
        assert (hits[0] == "shared") == name.startswith("shared_")


def test_item_similarity_needs_scores():
    model = UniCDR(CDRModelConfig(dim=4, aggregator="item_similarity"), 4, ("a", "b"), (7, 5))
    with pytest.raises(ValueError, match="item scores"):
        model.loss_terms(_batch())


def test_mean_aggregator_ignores_padding():
    agg = Aggregator(2, "mean", lambda_a=0.25, dropout=0.0)
    with torch.no_grad():
        agg.W_agg.weight.copy_(torch.eye(2))
    idv = torch.tensor([[4.0, 0.0], [0.0, 8.0]])
    ctx = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]], [[5.0, 5.0], [0.0, 0.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, True, False], [False, False, False]])
    out = agg(idv, ctx, valid)
    expect = torch.tensor([[0.25 * 4 + 0.75 * 2.0, 0.75 * 3.0], [0.0, 0.25 * 8]])
    torch.testing.assert_close(out, expect)


def test_attention_aggregator_weights():
    agg = Aggregator(2, "user_attention", lambda_a=0.0, dropout=0.0)
    with torch.no_grad():
        agg.W_agg.weight.copy_(torch.eye(2))
        agg.W_att[0].weight.copy_(torch.eye(2))
        agg.W_att[0].bias.zero_()
    idv = torch.tensor([[1.0, 0.0]])
    ctx = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    valid = torch.tensor([[True, True, False]])
    a = math.exp(math.tanh(1.0))
    w = torch.tensor([a / (a + 1), 1 / (a + 1)])
    torch.testing.assert_close(agg(idv, ctx, valid), w[None, :] @ ctx[0, :2])


def test_contrastive_loss_by_hand():
    spec = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    shared = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    critic = BilinearCritic(2)
    with torch.no_grad():
        critic.weight.copy_(torch.eye(2))
        critic.bias.zero_()
    # pos logits (2, 3), negatives (rolled by 1): (0, 0)
    expect = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-3))) / 2 + math.log(2)
    with torch.no_grad():
        got = contrastive_loss("bilinear", spec, shared, critic, 1, 0.5)
    assert abs(got.item() - expect) < 1e-6
    # InfoNCE: cosines are the identity; logits = I / 0.5
    expect_nce = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert abs(float(contrastive_loss("infonce", spec, shared, None, 1, 0.5)) - expect_nce) < 1e-6
    # bilinear critic = nn.Bilinear's formula
    bil = torch.nn.Bilinear(2, 2, 1)
    with torch.no_grad():
        critic.weight.copy_(bil.weight[0])
        critic.bias.copy_(bil.bias)
    x1, x2 = torch.randn(5, 2), torch.randn(5, 2)
    torch.testing.assert_close(critic(x1, x2), bil(x1, x2).view(-1))


def test_loss_value_by_hand():
    """A model whose representations are set by hand: rec and contrastive terms as computed here."""
    cfg = CDRModelConfig(dim=2, aggregator="mean", lambda_a=1.0, dropout=0.0, contrastive="bilinear",
                         contrastive_weight=0.25)
    model = UniCDR(cfg, 2, ("a", "b"), (3, 3))
    with torch.no_grad():
        model.specific_user["a"].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model.shared_user.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
        model.item_emb["a"].weight[:3].copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model.critic["a"].weight.copy_(torch.eye(2))
        model.critic["a"].bias.zero_()
    pad = torch.full((2, 1), 3)
    b = CDRBatch(0, torch.tensor([0, 1]), pad, (pad, pad), pos=torch.tensor([0, 1]), neg=torch.tensor([[1], [2]]))
    user = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    pos = torch.tensor([2.0, 1.0])
    neg = torch.tensor([1.0, 1.0])
    rec = F.softplus(-pos).mean() + F.softplus(neg).mean()
    spec, sh = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    con = F.softplus(-(spec * sh).sum(1)).mean() + F.softplus((spec.roll(1, 0) * sh).sum(1)).mean()
    terms = model.loss_terms(b, shift=1)
    torch.testing.assert_close(terms["rec"], rec)
    torch.testing.assert_close(terms["contrastive"], con)
    torch.testing.assert_close(terms["loss"], 0.75 * rec + 0.25 * con)
    del user


def _subset(orig: torch.Tensor, new: torch.Tensor, pad: int) -> bool:
    kept = new != pad
    return bool(((new == orig) | ~kept).all())


def test_edge_dropout_invariants():
    b = _batch(B=64, L=6)
    gen = torch.Generator().manual_seed(0)
    same = EdgeDropout(0.0, (7, 5)).batch(b, gen)
    assert torch.equal(same.own, b.own) and all(torch.equal(x, y) for x, y in zip(same.shared, b.shared))
    p = EdgeDropout(0.5, (7, 5))
    out = p.batch([b, b], gen)
    assert isinstance(out, list) and len(out) == 2
    o = out[0]
    assert o.own.shape == b.own.shape and torch.equal(o.pos, b.pos) and torch.equal(o.neg, b.neg)
    assert _subset(b.own, o.own, 7) and _subset(b.shared[1], o.shared[1], 5)
    valid = b.own != 7
    frac = float(((o.own == 7) & valid).sum() / valid.sum())
    assert 0.3 < frac < 0.7
    assert p.magnitude() == (0.5, 0.0)
    with pytest.raises(ValueError, match="edge_dropout_rate"):
        EdgeDropout(1.0, (7, 5))


def test_popularity_reweighting_invariants():
    pop = [np.array([100.0, 1, 1, 1, 1, 1, 1]), np.array([1.0, 1, 1, 1, 1])]
    b = _batch(B=200, L=6, seed=1)
    gen = torch.Generator().manual_seed(0)
    ident = PopularityReweighting(0.0, pop).batch(b, gen)
    assert torch.equal(ident.own, b.own)
    p = PopularityReweighting(1.0, pop)
    o = p.batch(b, gen)
    assert _subset(b.own, o.own, 7) and torch.equal(o.shared[1], b.shared[1])  # domain b: all at the median
    popular = b.own == 0
    assert float((o.own[popular] == 7).float().mean()) > 0.9  # kept with probability 1/100
    assert torch.equal(o.own[(b.own > 0) & (b.own < 7)], b.own[(b.own > 0) & (b.own < 7)])
    assert abs(p.magnitude()[0] - 99 / 111) < 1e-9  # 99 of the 111 training interactions


def test_rec_loss_by_hand():
    pos, neg = torch.tensor([2.0, -1.0]), torch.tensor([[0.0, 1.0], [3.0, -2.0]])
    bce = F.softplus(-pos).mean() + F.softplus(neg).mean()
    torch.testing.assert_close(rec_loss("bce", pos, neg), bce)
    soft = -(pos - torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1)).mean()
    torch.testing.assert_close(rec_loss("softmax", pos, neg), soft)
    with pytest.raises(ValueError, match="rec_loss"):
        rec_loss("hinge", pos, neg)


def test_item_bias_enters_training_and_scores():
    torch.manual_seed(0)
    plain = UniCDR(CDRModelConfig(dim=6, dropout=0.0), 4, ("a", "b"), (7, 5))
    torch.manual_seed(0)
    biased = UniCDR(CDRModelConfig(dim=6, dropout=0.0, item_bias=True), 4, ("a", "b"), (7, 5))
    plain.eval()
    biased.eval()
    b = _batch(train=False)
    torch.testing.assert_close(biased.score_all(b), plain.score_all(b))  # zero at init, same embeddings
    with torch.no_grad():
        biased.item_bias["a"].copy_(torch.arange(7.0))
    torch.testing.assert_close(biased.score_all(b) - plain.score_all(b), torch.arange(7.0).expand(4, 7))
    biased.train()
    biased.loss_terms(_batch(), shift=1)["loss"].backward()
    assert biased.item_bias["a"].grad.abs().sum() > 0 and biased.item_bias["b"].grad is None
    assert "item_bias.*" in UniCDR.parameter_groups()["specific"]


def test_init_std_sets_embedding_scale():
    torch.manual_seed(0)
    model = UniCDR(CDRModelConfig(dim=32, init_std=1.0), 500, ("a", "b"), (400, 300))
    w = model.item_emb["a"].weight.detach()[:400]
    assert 0.9 < float(w.std()) < 1.1 and float(model.item_emb["a"].weight.detach()[400].abs().sum()) == 0
    assert 0.9 < float(model.shared_user.weight.detach().std()) < 1.1
