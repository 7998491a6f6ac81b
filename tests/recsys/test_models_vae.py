"""Mult-DAE and Mult-VAE: architecture, input layer order, loss terms, KL annealing, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from fishertune.recsys.models import MultDAE, MultDAEConfig, MultVAE, MultVAEConfig
from fishertune.recsys.models.vae import input_dropout, kl_annealing, multinomial_nll

N_ITEMS = 20




def _batch(seed: int = 0, rows: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(rows, N_ITEMS, generator=g) < 0.3).float()
    x[:, 0] = 1.0  # no empty row
    return x


def _vae(**kw) -> MultVAE:
    torch.manual_seed(0)
    return MultVAE(MultVAEConfig(hidden_dims=[12], latent_dim=5, **kw), 10, N_ITEMS)


def test_default_dims_follow_the_paper():
    vae = MultVAE(MultVAEConfig(), 3, 100)
    assert [(l.in_features, l.out_features) for l in vae.encoder] == [(100, 600), (600, 400)]
    assert [(l.in_features, l.out_features) for l in vae.decoder] == [(200, 600), (600, 100)]
    dae = MultDAE(MultDAEConfig(), 3, 100)
    assert [(l.in_features, l.out_features) for l in dae.layers] == [(100, 600), (600, 200), (200, 600), (600, 100)]
    deep = MultVAE(MultVAEConfig(hidden_dims=[50, 30], latent_dim=7), 3, 100)
    assert [l.out_features for l in deep.encoder] == [50, 30, 14]
    assert [l.out_features for l in deep.decoder] == [30, 50, 100]


def test_initialisation_xavier_weights_tiny_biases():
    vae = MultVAE(MultVAEConfig(), 3, 1000)
    w = vae.encoder[0].weight
    bound = math.sqrt(6.0 / (1000 + 600))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    for layer in [*vae.encoder, *vae.decoder]:
        assert layer.bias.abs().max() <= 0.002 and layer.bias.std() < 0.0015


def test_input_layer_normalize_then_dropout():
    """Reference order: values of kept items are x / ||x|| / keep_prob, so rows are not unit norm."""
    vae = _vae(input_order="normalize_dropout", dropout=0.5)
    x = _batch()
    out = vae.input_layer(x, train=True)
    unit = x / x.norm(dim=1, keepdim=True)
    kept = out != 0
    assert torch.allclose(out[kept], (unit * 2.0)[kept])
    assert kept.any() and (x.bool() & ~kept).any()  # something kept, something dropped
    # eval: no dropout, unit-norm rows
    assert torch.allclose(vae.input_layer(x, train=False), unit)


def test_input_layer_dropout_then_normalize():
    """Dropout first: the kept items are re-normalised, so each row has unit norm again."""
    vae = _vae(input_order="dropout_normalize", dropout=0.5)
    x = _batch()
    torch.manual_seed(3)
    out = vae.input_layer(x, train=True)
    nonempty = out.abs().sum(1) > 0
    assert nonempty.any()
    assert torch.allclose(out[nonempty].norm(dim=1), torch.ones(int(nonempty.sum())))
    counts = (out != 0).sum(1, keepdim=True).float()
    kept = out != 0
    assert torch.allclose(out[kept], (1.0 / counts.sqrt()).expand_as(out)[kept])
    assert torch.allclose(vae.input_layer(x, train=False), x / x.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("order", ["normalize_dropout", "dropout_normalize"])
def test_encoder_op_order_matches_a_hand_written_forward(order):
    """dropout/normalise (configured order) -> linear -> tanh -> linear -> (mu, logvar)."""
    vae = _vae(input_order=order)
    x = _batch(1)
    torch.manual_seed(11)
    mu, logvar = vae.encode(x, train=True)
    torch.manual_seed(11)  # the same dropout mask
    if order == "normalize_dropout":
        h = input_dropout(F.normalize(x, dim=1), 0.5, True)
    else:
        h = F.normalize(input_dropout(x, 0.5, True), dim=1)
    h = torch.tanh(h @ vae.encoder[0].weight.T + vae.encoder[0].bias)
    h = h @ vae.encoder[1].weight.T + vae.encoder[1].bias  # no tanh on the last encoder layer
    assert torch.allclose(mu, h[:, :5], atol=1e-6) and torch.allclose(logvar, h[:, 5:], atol=1e-6)
    # decoder: linear -> tanh -> linear (logits, no activation)
    z = torch.randn(3, 5)
    ref = torch.tanh(z @ vae.decoder[0].weight.T + vae.decoder[0].bias) @ vae.decoder[1].weight.T + vae.decoder[1].bias
    assert torch.allclose(vae.decode(z), ref, atol=1e-6)


def test_input_dropout_is_inverted_dropout_of_the_nonzeros():
    torch.manual_seed(0)
    x = torch.rand(200, 300) * (torch.rand(200, 300) < 0.1)
    out = input_dropout(x, 0.25, train=True)
    kept = out != 0
    assert not (kept & (x == 0)).any()  # zeros stay zero
    assert torch.allclose(out[kept], x[kept] / 0.75)
    frac_dropped = 1 - kept.sum().item() / (x != 0).sum().item()
    assert abs(frac_dropped - 0.25) < 0.03  # ~6000 nonzeros: 4.5 standard deviations
    assert torch.equal(input_dropout(x, 0.25, train=False), x) and torch.equal(input_dropout(x, 0.0, True), x)
    torch.manual_seed(1)
    a = input_dropout(x, 0.5, True)
    torch.manual_seed(1)
    assert torch.equal(a, input_dropout(x, 0.5, True))  # reproducible from the torch seed


def test_dae_keeps_tanh_on_the_code_layer():
    torch.manual_seed(0)
    dae = MultDAE(MultDAEConfig(hidden_dims=[12], latent_dim=5), 10, N_ITEMS)
    x = _batch(2)
    h = F.normalize(x, dim=1)
    for i, layer in enumerate(dae.layers):
        h = layer(h)
        if i < len(dae.layers) - 1:
            h = torch.tanh(h)
    assert torch.allclose(dae.score(torch.arange(6), x), h, atol=1e-6)


def test_multinomial_nll_against_a_loop():
    logits, x = torch.randn(4, N_ITEMS), _batch(3, rows=4)
    total = 0.0
    for b in range(4):
        p = torch.exp(logits[b]) / torch.exp(logits[b]).sum()
        total += -sum(float(x[b, i]) * math.log(float(p[i])) for i in range(N_ITEMS))
    assert multinomial_nll(logits, x).item() == pytest.approx(total / 4, rel=1e-5)


def test_kl_annealing_schedule():
    assert kl_annealing(0, 0.2, 200_000) == 0.0
    assert kl_annealing(1_000, 0.2, 200_000) == pytest.approx(0.005)
    assert kl_annealing(40_000, 0.2, 200_000) == pytest.approx(0.2)
    assert kl_annealing(10**6, 0.2, 200_000) == 0.2
    assert kl_annealing(5, 0.3, 0) == 0.3
    assert kl_annealing(50, 1.0, 100) == 0.5


def test_vae_training_step_terms():
    vae = _vae(total_anneal_steps=100, anneal_cap=0.2)
    x = _batch(4)
    torch.manual_seed(5)
    out = vae.training_step(x, step=10)
    assert set(out) == {"loss", "neg_ll", "kl", "beta", "l2"}
    assert out["beta"].item() == pytest.approx(0.1)
    assert out["loss"].item() == pytest.approx(out["neg_ll"].item() + 0.1 * out["kl"].item(), rel=1e-6)
    # the KL term is KL(q(z|x) || N(0, I)), summed over latent dims, averaged over the batch
    torch.manual_seed(5)
    mu, logvar = vae.encode(x, train=True)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1).mean()
    assert out["kl"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert out["loss"].requires_grad and not out["kl"].requires_grad


def test_l2_penalty_covers_weights_not_biases():
    vae = _vae(l2=0.01)
    ref = sum(float((l.weight.detach() ** 2).sum()) for l in [*vae.encoder, *vae.decoder])
    assert vae.l2_penalty().item() == pytest.approx(ref, rel=1e-6)
    torch.manual_seed(0)
    out = vae.training_step(_batch(), step=0)  # beta = 0
    assert out["loss"].item() == pytest.approx(out["neg_ll"].item() + 0.01 * ref, rel=1e-6)


def test_reparameterisation_only_in_training_and_scoring_is_deterministic():
    vae = _vae()
    x = _batch(6)
    vae.train()  # scoring ignores the module mode: always the mean, no dropout
    s1 = vae.score(torch.arange(6), x)
    vae.eval()
    s2 = vae.score(torch.arange(6), x)
    assert torch.equal(s1, s2) and s1.shape == (6, N_ITEMS)
    mu, _ = vae.encode(x, train=False)
    assert torch.allclose(s1, vae.decode(mu))
    a, b = vae.training_step(x, 0)["neg_ll"], vae.training_step(x, 0)["neg_ll"]
    assert a.item() != b.item()  # dropout and sampling are on in training


def test_forward_is_the_training_step():
    vae = _vae(dropout=0.0)
    x = _batch(7)
    torch.manual_seed(1)
    a = vae(x, 3)
    torch.manual_seed(1)
    b = vae.training_step(x, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_few_adam_steps_fit_a_tiny_matrix():
    torch.manual_seed(0)
    dae = MultDAE(MultDAEConfig(hidden_dims=[16], latent_dim=8, dropout=0.0, l2=0.0), 6, N_ITEMS)
    x = _batch(8)
    opt = torch.optim.Adam(dae.parameters(), lr=1e-2)
    first = None
    for step in range(60):
        loss = dae.training_step(x, step)["loss"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
