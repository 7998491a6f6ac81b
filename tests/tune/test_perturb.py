"""Perturbations keep their invariants: zero sizes are the identity, FeatureShift produces the stated
statistics, draws are reproducible from the generator, magnitudes add, bad sizes name the key."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fishertune.tune.perturb import Combined, FeatureShift, NoiseInjection, Perturbation, check_range


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def test_identity_base():
    p = Perturbation()
    b = (torch.ones(2), torch.zeros(2))
    assert p.batch(b, torch.Generator()) is b
    assert p.magnitude() == (0.0, 0.0)
    m = _model()
    x = torch.randn(4, 5)
    with p.context(m):
        assert torch.equal(m(x), m(x))


@pytest.mark.parametrize("make", [lambda: NoiseInjection(["0"], 0.0), lambda: FeatureShift(["0"], 0.0, 0.0)])
def test_zero_sizes_are_identity(make):
    m = _model()
    x = torch.randn(6, 5)
    want = m(x)
    p = make()
    p.generator = torch.Generator().manual_seed(3)
    with p.context(m):
        got = m(x)
    assert torch.equal(got, want)


def test_noise_injection_std_and_reproducible():
    m = _model()
    x = torch.randn(4000, 5)
    clean = m[0](x)
    p = NoiseInjection(["0"], 0.3)
    assert p.magnitude() == (0.0, 0.3)
    outs = []
    for _ in range(2):
        p.generator = torch.Generator().manual_seed(7)
        with p.context(m):
            outs.append(m[0](x))
    assert torch.equal(outs[0], outs[1])
    noise = (outs[0] - clean).detach()
    assert abs(float(noise.std()) - 0.3) < 0.01 and abs(float(noise.mean())) < 0.01
    assert torch.equal(m[0](x), clean)                      # hooks removed after the context


def test_feature_shift_deterministic_gives_stated_statistics():
    m = _model()
    x = torch.randn(10, 5)
    h = m[0](x)
    mu, sigma = h.mean(-1, keepdim=True), h.std(-1, unbiased=False, keepdim=True)
    p = FeatureShift(["0"], eps_mu=0.4, eps_sigma=0.2, random=False, eps=0.0)
    with p.context(m):
        out = m[0](x)
    torch.testing.assert_close(out.mean(-1, keepdim=True), mu + 0.4 * sigma)
    torch.testing.assert_close(out.std(-1, unbiased=False, keepdim=True), sigma * math.exp(0.2))
    # the standardised pattern is unchanged
    torch.testing.assert_close((out - out.mean(-1, keepdim=True)) / out.std(-1, unbiased=False, keepdim=True),
                               (h - mu) / sigma)


def test_feature_shift_random_uses_generator_draws():
    m = _model()
    x = torch.randn(7, 5)
    h = m[0](x)
    mu, sigma = h.mean(-1, keepdim=True), h.std(-1, unbiased=False, keepdim=True)
    p = FeatureShift(["0"], eps_mu=0.5, eps_sigma=0.3, random=True, eps=0.0)
    p.generator = torch.Generator().manual_seed(11)
    with p.context(m):
        out = m[0](x)
    g = torch.Generator().manual_seed(11)
    z_mu, z_sigma = torch.randn(7, 1, generator=g), torch.randn(7, 1, generator=g)
    torch.testing.assert_close(out.mean(-1, keepdim=True), mu + 0.5 * sigma * z_mu)
    torch.testing.assert_close(out.std(-1, unbiased=False, keepdim=True), sigma * torch.exp(0.3 * z_sigma))


def test_output_hook_runs_after_hooks_registered_later():
    """A hook registered after the perturbation (as the Fisher engine does) sees the clean output."""
    m = _model()
    x = torch.randn(3, 5)
    seen = {}
    p = FeatureShift(["0"], 0.5, 0.5, random=False)
    with p.context(m):
        h = m[0].register_forward_hook(lambda mod, a, out: seen.setdefault("out", out.detach().clone()))
        shifted = m[0](x)
        h.remove()
    torch.testing.assert_close(seen["out"], m[0](x))
    assert not torch.allclose(shifted, seen["out"])


class _DropFirst(Perturbation):
    name = "drop"

    def magnitude(self):
        return (0.1, 0.2)

    def batch(self, batch, generator):
        return batch[1:]


def test_combined_adds_magnitudes_and_chains():
    c = Combined([_DropFirst(), NoiseInjection(["0"], 0.3), FeatureShift(["2"], 0.1, 0.05)])
    mu, sd = c.magnitude()
    assert mu == pytest.approx(0.2) and sd == pytest.approx(0.55)
    assert c.batch([1, 2, 3], torch.Generator()) == [2, 3]
    m = _model()
    x = torch.randn(3, 5)
    c.generator = torch.Generator().manual_seed(0)
    with c.context(m):
        a = m(x)
    assert not torch.allclose(a, m(x))


def test_bad_sizes_and_patterns_are_clear_errors():
    with pytest.raises(ValueError, match="perturbation_noise_std"):
        NoiseInjection(["0"], -0.1)
    with pytest.raises(ValueError, match="feature_shift_mu"):
        FeatureShift(["0"], -1.0, 0.0)
    with pytest.raises(ValueError, match=r"edge_dropout_rate must be in \[0.0, 1.0\)"):
        check_range("edge_dropout_rate", 1.0, 0.0, 1.0, high_open=True)
    assert check_range("edge_dropout_rate", 0.5, 0.0, 1.0, high_open=True) == 0.5
    with pytest.raises(ValueError, match="nope"):
        with NoiseInjection(["nope*"], 0.1).context(_model()):
            pass
    with pytest.raises(ValueError, match="at least one"):
        Combined([])
