"""Diagonal Fisher: hook paths vs brute-force loops over single samples, every layer and likelihood."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from brute import assert_close, brute_empirical, brute_ggn_diag
from fishertune.fisher import (CallableLikelihood, UnsupportedModuleError, diagonal_fisher, get_likelihood)


def batches(inputs, target, size):
    B = target.shape[0]
    return [(tuple(x[s:s + size] for x in inputs), target[s:s + size]) for s in range(0, B, size)]


def run(model, inputs, target, lik="categorical", size=4, **kw):
    return diagonal_fisher(model, batches(inputs, target, size), likelihood=lik, progress=False, **kw)


# -- models ------------------------------------------------------------------------------------------


class SeqModel(nn.Module):
    """Embedding (several lookups per sample, duplicates, padding) -> Linear on 3-D -> LayerNorm -> head."""

    def __init__(self, vocab=7, d=5, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.lin = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, idx):
        h = self.norm(torch.tanh(self.lin(self.emb(idx))))
        return self.head(h.mean(1))


class TokenModel(SeqModel):
    """Position-wise: every position predicts its own class (token-level mode is exact here)."""

    def forward(self, idx):
        return self.head(self.norm(torch.tanh(self.lin(self.emb(idx)))))


class ConvModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, stride=1)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, groups=2, dilation=1, padding="valid")
        self.c3 = nn.Conv2d(4, 2, 2, padding="same", padding_mode="reflect", dilation=2)
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h))
        h = self.bn(self.c3(h))
        return self.head(h.flatten(1))


class Conv1dModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(3, 4, 3, padding=2, stride=2, dilation=2)
        self.c2 = nn.Conv1d(4, 2, 2, padding="same", padding_mode="circular")
        self.bn = nn.BatchNorm1d(2)
        self.head = nn.Linear(2 * 8, 3)

    def forward(self, x):
        return self.head(self.bn(torch.tanh(self.c2(torch.tanh(self.c(x))))).flatten(1))


class Gate(nn.Module):
    """A custom module with its own parameters (no rule): torch.func path."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) * 0.3)
        self.g = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.tanh(x @ self.w) * torch.sigmoid(self.g) + x.cumsum(1) * self.g


class Tied(nn.Module):
    """Item embedding reused as the output layer (SASRec style), a parameter used in forward, a custom
    module, a module called twice."""

    def __init__(self, n=6, d=4):
        super().__init__()
        self.emb = nn.Embedding(n, d)
        self.pos = nn.Parameter(torch.randn(3, d) * 0.1)
        self.rnn = Gate(d)
        self.shared = nn.Linear(d, d)

    def forward(self, idx):
        h = self.emb(idx) + self.pos
        h = self.shared(torch.tanh(self.shared(h)))  # called twice: per-sample grads summed first
        h = self.rnn(h)
        return h[:, -1] @ self.emb.weight.t()


def mlp(i=5, h=7, o=3, **kw):
    return nn.Sequential(nn.Linear(i, h), nn.Tanh(), nn.Linear(h, o))


# -- layer paths (empirical Fisher, categorical) --------------------------------------------------------


def test_linear_mlp():
    m = mlp()
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    res = run(m, (x,), y)
    assert res.paths == {"linear": ["0", "2"]}
    assert res.n_samples == 10
    assert_close(res.fisher, brute_empirical(m, (x,), y, get_likelihood("categorical")))


def test_embedding_linear3d_layernorm_sequence():
    m = SeqModel()
    idx = torch.randint(0, 7, (9, 6))
    idx[0, :3] = 2  # duplicates within a sample
    idx[1, 4:] = 0  # padding
    y = torch.randint(0, 3, (9,))
    res = run(m, (idx,), y, size=4)
    assert set(res.paths) == {"embedding", "linear", "layernorm"}
    assert_close(res.fisher, brute_empirical(m, (idx,), y, get_likelihood("categorical")))


def test_single_index_embedding():
    m = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2))
    idx, y = torch.tensor([1, 1, 3, 4, 1, 0]), torch.randint(0, 2, (6,))
    res = run(m, (idx,), y, size=6)
    assert_close(res.fisher, brute_empirical(m, (idx,), y, get_likelihood("categorical")))
    assert res["0.weight"][2].abs().sum() == 0  # an untouched row stays exactly zero


def test_token_level():
    m = TokenModel()
    idx = torch.randint(1, 7, (5, 4))
    y = torch.randint(0, 3, (5, 4))
    y[0, 1] = -100
    y[3, 0] = -100
    res = run(m, (idx,), y, size=2, token_level=True)
    assert res.n_samples == 18
    assert_close(res.fisher, brute_empirical(m, (idx,), y, get_likelihood("categorical"), token_level=True))


def test_token_level_refuses_mixing_modules():
    m = nn.Sequential(nn.Conv1d(3, 3, 1), nn.Linear(4, 3))
    with pytest.raises(UnsupportedModuleError, match="token_level"):
        run(m, (torch.randn(2, 3, 4),), torch.randint(0, 3, (2, 3)), token_level=True)


def test_conv2d_groups_stride_padding_modes_batchnorm_eval():
    m = ConvModel()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    x, y = torch.randn(6, 2, 8, 8), torch.randint(0, 3, (6,))
    res = run(m, (x,), y, size=4)
    assert set(res.paths) == {"conv", "batchnorm", "linear"}
    m.eval()
    assert_close(res.fisher, brute_empirical(m, (x,), y, get_likelihood("categorical")))


def test_conv1d():
    m = Conv1dModel()
    x, y = torch.randn(5, 3, 15), torch.randint(0, 3, (5,))
    res = run(m, (x,), y, size=3)
    m.eval()
    assert_close(res.fisher, brute_empirical(m, (x,), y, get_likelihood("categorical")))


class AttnVariants(nn.Module):
    """Self-attention with a causal mask and padding, cross-attention with kdim != embed_dim."""

    def __init__(self, batch_first=True, zero_attn=False, need_weights=False):
        super().__init__()
        self.bf, self.nw = batch_first, need_weights
        self.inp = nn.Linear(4, 6)
        self.blocks = nn.ModuleList([nn.MultiheadAttention(6, 2, batch_first=batch_first, add_zero_attn=zero_attn)])
        self.cross = nn.MultiheadAttention(6, 3, kdim=4, vdim=5, batch_first=True, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x, pad):
        h = self.inp(x)
        L = h.shape[1]
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
        hh = h if self.bf else h.transpose(0, 1)
        a, _ = self.blocks[0](hh, hh, hh, key_padding_mask=pad, attn_mask=causal, need_weights=self.nw)
        a = a if self.bf else a.transpose(0, 1)
        c, _ = self.cross(a, x, torch.cat([x, x[..., :1]], -1))
        return self.head((a + c).mean(1))


@pytest.mark.parametrize("batch_first,need_weights", [(True, False), (False, True)])
def test_multihead_attention_by_hooks(batch_first, need_weights):
    m = AttnVariants(batch_first, need_weights=need_weights)
    x = torch.randn(5, 3, 4)
    pad = torch.zeros(5, 3, dtype=torch.bool)
    pad[1, 2] = True
    y = torch.randint(0, 3, (5,))
    res = run(m, (x, pad), y, size=3)
    assert res.paths["attention"] == ["blocks.0", "cross"] and "functorch" not in res.paths
    assert res.param_paths["blocks.0.out_proj.weight"] == "attention@blocks.0"
    assert res.param_paths["cross.q_proj_weight"] == "attention@cross"
    assert_close(res.fisher, brute_empirical(m, (x, pad), y, get_likelihood("categorical")))
    # the patched forward is gone afterwards and the module still computes the same thing
    assert "forward" not in m.blocks[0].__dict__


def test_multihead_attention_torch_func_fallback():
    m = AttnVariants(zero_attn=True)  # add_zero_attn: no hook rule -> torch.func on the module
    x = torch.randn(4, 3, 4)
    pad = torch.zeros(4, 3, dtype=torch.bool)
    y = torch.randint(0, 3, (4,))
    res = run(m, (x, pad), y, size=4)
    assert res.param_paths["blocks.0.in_proj_weight"] == "functorch@blocks.0"
    assert res.param_paths["blocks.0.out_proj.weight"] == "functorch@blocks.0"
    assert_close(res.fisher, brute_empirical(m, (x, pad), y, get_likelihood("categorical")))


def test_tied_weights_parameter_in_forward_gru_and_multi_call():
    m = Tied()
    idx = torch.randint(0, 6, (7, 3))
    y = torch.randint(0, 6, (7,))
    res = run(m, (idx,), y, size=4)
    pp = res.param_paths
    assert pp["emb.weight"] == "functorch@<root>" and pp["pos"] == "functorch@<root>"
    assert pp["rnn.w"] == "functorch@rnn"
    assert pp["shared.weight"] == "linear@shared"
    assert_close(res.fisher, brute_empirical(m, (idx,), y, get_likelihood("categorical")))


def test_multi_call_embedding_sums_before_squaring():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, a, b):
            return self.head(self.emb(a).sum(1) * self.emb(b).sum(1))

    m = Twice()
    a, b = torch.randint(0, 5, (6, 2)), torch.randint(0, 5, (6, 3))
    y = torch.randint(0, 2, (6,))
    res = run(m, (a, b), y, size=4)
    assert res.param_paths["emb.weight"] == "embedding@emb"
    assert_close(res.fisher, brute_empirical(m, (a, b), y, get_likelihood("categorical")))


def test_rmsnorm_and_train_mode_batchnorm_warning():
    m = nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6), nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    res = run(m, (x,), y)
    assert res.param_paths["1.weight"] == "rmsnorm@1"
    assert_close(res.fisher, brute_empirical(m, (x,), y, get_likelihood("categorical")))
    bn = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    with pytest.warns(RuntimeWarning, match="train mode"):
        run(bn, (x,), y, train_mode=True)


# -- likelihoods ------------------------------------------------------------------------------------


def test_multinomial_bernoulli_gaussian_callable():
    m = mlp(5, 6, 4)
    x = torch.randn(9, 5)
    counts = (torch.rand(9, 4) < 0.4).double()
    counts[0, 0] = 2
    for name, target in [("multinomial", counts), ("bernoulli", (torch.rand(9, 4) < 0.5).double()),
                         ("gaussian", torch.randn(9, 4))]:
        res = run(m, (x,), target, lik=name)
        assert_close(res.fisher, brute_empirical(m, (x,), target, get_likelihood(name)))

    def laplace(out, y):
        return -(out - y).abs().sum(-1)

    y = torch.randn(9, 4)
    res = run(m, (x,), y, lik=laplace)
    assert_close(res.fisher, brute_empirical(m, (x,), y, CallableLikelihood(laplace)))


def test_sequence_categorical_sums_positions():
    m = TokenModel()
    idx = torch.randint(1, 7, (5, 4))
    y = torch.randint(0, 3, (5, 4))
    y[2, 3] = -100
    res = run(m, (idx,), y, size=3)
    assert res.n_samples == 5
    assert_close(res.fisher, brute_empirical(m, (idx,), y, get_likelihood("categorical")))


# -- exact / Monte-Carlo ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["categorical", "gaussian", "bernoulli", "multinomial"])
def test_exact_fisher_equals_ggn_diagonal(name):
    m = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    x = torch.randn(6, 3)
    target = {"categorical": torch.randint(0, 4, (6,)), "gaussian": torch.randn(6, 4),
              "bernoulli": (torch.rand(6, 4) < 0.5).double(), "multinomial": torch.randint(0, 3, (6, 4)).double()}[name]
    res = run(m, (x,), target, lik=name, kind="exact")
    assert_close(res.fisher, brute_ggn_diag(m, (x,), target, get_likelihood(name)))


def test_exact_categorical_equals_enumeration_over_classes():
    m = SeqModel()
    idx = torch.randint(0, 7, (5, 4))
    y = torch.randint(0, 3, (5,))
    res = run(m, (idx,), y, kind="exact", size=5)
    with torch.no_grad():
        p = torch.softmax(m(idx), -1)
    want = None
    for c in range(3):
        # sum_c p_c g_c^2: weight each sample's squared gradient by its p_c (loop over samples)
        per = []
        for i in range(5):
            g = brute_empirical(m, (idx[i:i + 1],), torch.tensor([c]), get_likelihood("categorical"))
            per.append({n: v * p[i, c] for n, v in g.items()})
        tot = {n: sum(d[n] for d in per) / 5 for n in per[0]}
        want = tot if want is None else {n: want[n] + tot[n] for n in want}
    assert_close(res.fisher, want)


def test_monte_carlo_converges_to_exact():
    m = mlp(3, 4, 3)
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    exact = run(m, (x,), y, kind="exact")
    gen = torch.Generator().manual_seed(1)
    mc = run(m, (x,), y, kind="true", n_samples=3000, generator=gen)
    for n in exact:
        rel = (mc[n] - exact[n]).norm() / exact[n].norm()
        assert rel < 0.06, (n, float(rel))


def test_sqrt_factors_match_enumeration_with_temperature():
    import itertools
    z = torch.randn(2, 3)
    T = 0.7
    for name in ["categorical", "bernoulli"]:
        lik = get_likelihood(name)
        got = sum(torch.einsum("bi,bj->bij", c, c) for c in lik.sqrt_factor(z, None, temperature=T))
        want = torch.zeros(2, 3, 3)
        p = torch.softmax(z, -1) if name == "categorical" else torch.sigmoid(z)
        q = torch.softmax(z / T, -1) if name == "categorical" else torch.sigmoid(z / T)
        if name == "categorical":
            for c in range(3):
                g = p - torch.eye(3)[c]
                want += q[:, c, None, None] * torch.einsum("bi,bj->bij", g, g)
        else:
            for ys in itertools.product([0.0, 1.0], repeat=3):
                yv = torch.tensor(ys)
                prob = (q ** yv * (1 - q) ** (1 - yv)).prod(-1)
                g = p - yv
                want += prob[:, None, None] * torch.einsum("bi,bj->bij", g, g)
        torch.testing.assert_close(got, want)


def test_multinomial_sqrt_factor_with_temperature_matches_enumeration():
    import itertools
    z = torch.randn(1, 3)
    T, N = 1.6, 2
    lik = get_likelihood("multinomial")
    target = torch.tensor([[1.0, 1.0, 0.0]])
    got = sum(torch.einsum("bi,bj->bij", c, c) for c in lik.sqrt_factor(z, target, temperature=T))
    p, q = torch.softmax(z, -1)[0], torch.softmax(z / T, -1)[0]
    want = torch.zeros(3, 3)
    for draws in itertools.product(range(3), repeat=N):
        x = torch.bincount(torch.tensor(draws), minlength=3).double()
        g = N * p - x
        want += q[list(draws)].prod() * torch.outer(g, g)
    torch.testing.assert_close(got[0], want)


# -- options ----------------------------------------------------------------------------------------


def test_batch_size_invariance_and_unnormalised_sums():
    m = mlp()
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    a, b = run(m, (x,), y, size=12), run(m, (x,), y, size=5)
    assert_close(a.fisher, b.fisher)
    s = run(m, (x,), y, size=5, normalize=False)
    assert_close(s.fisher, {n: v * 12 for n, v in a.items()})


def test_selective_parameters_and_modules():
    m = SeqModel()
    idx, y = torch.randint(0, 7, (6, 4)), torch.randint(0, 3, (6,))
    full = run(m, (idx,), y)
    part = run(m, (idx,), y, params=[r"head\..*", "emb.weight"])
    assert set(part) == {"head.weight", "head.bias", "emb.weight"}
    assert_close(part.fisher, {n: full[n] for n in part})
    only = run(m, (idx,), y, modules=[nn.LayerNorm])
    assert set(only) == {"norm.weight", "norm.bias"}
    assert_close(only.fisher, {n: full[n] for n in only})
    assert all(p.requires_grad for p in m.parameters())  # flags restored
    with pytest.raises(ValueError, match="no trainable parameter matches"):
        run(m, (idx,), y, params=["nope"])


def test_fp16_like_model_accumulates_in_float32():
    m = mlp().float()
    x, y = torch.randn(8, 5).float(), torch.randint(0, 3, (8,))
    res = run(m, (x,), y, autocast_dtype=torch.bfloat16)
    assert all(v.dtype == torch.float32 for v in res.values())
    ref = run(m.double(), (x.double(),), y)
    for n in ref:
        assert (res[n].double() - ref[n]).abs().max() <= 0.05 * ref[n].abs().max() + 1e-6


def test_half_precision_model_parameters():
    m = mlp().to(torch.bfloat16)
    x, y = torch.randn(8, 5).to(torch.bfloat16), torch.randint(0, 3, (8,))
    res = run(m, (x,), y)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in res.values())


# -- bad input --------------------------------------------------------------------------------------


def test_nonfinite_batches_are_skipped_or_raise():
    m = mlp()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    x[5, 0] = float("nan")
    res = run(m, (x,), y, size=4)  # second batch has a NaN
    assert res.skipped_batches == 1 and res.n_samples == 4
    assert all(torch.isfinite(v).all() for v in res.values())
    assert_close(res.fisher, brute_empirical(m, (x[:4],), y[:4], get_likelihood("categorical")))
    y2 = torch.cat([y, y[:4]])
    x2 = torch.cat([x, x[:4]])  # the bad batch in the middle: skipped, the others kept
    mid = run(m, (x2,), y2, size=4)
    assert mid.skipped_batches == 1 and mid.n_samples == 8 and mid.n_batches == 2
    assert_close(mid.fisher, res.fisher)
    from fishertune.fisher import NonFiniteError
    with pytest.raises(NonFiniteError):
        run(m, (x,), y, size=4, on_nonfinite="raise")
    x[:, 0] = float("inf")
    with pytest.raises(ValueError, match="no usable samples"):
        run(m, (x,), y, size=4)


def test_nonfinite_gradient_with_finite_loss_is_caught():
    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, poison):
            ctx.poison = poison
            return h.clone()

        @staticmethod
        def backward(ctx, g):
            return (g * float("nan") if ctx.poison else g), None

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(NanGrad.apply(self.a(x), bool(x[:, 0].max() > 100)))

    m = Bad()
    x, y = torch.randn(6, 2), torch.randint(0, 2, (6,))
    x[4, 0] = 1000.0  # the second batch's gradients reaching layer a are NaN; its loss is finite
    res = run(m, (x,), y, size=3)
    assert res.skipped_batches == 1 and res.n_samples == 3
    assert all(torch.isfinite(v).all() for v in res.values())
    assert_close(res.fisher, brute_empirical(m, (x[:3],), y[:3], get_likelihood("categorical")))


def test_errors():
    frozen = mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="no trainable parameters"):
        run(frozen, (x,), y)
    with pytest.raises(ValueError, match="no batches"):
        diagonal_fisher(mlp(), [], progress=False)
    with pytest.raises(UnsupportedModuleError, match="fallback=False"):
        run(AttnVariants(zero_attn=True), (torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool)),
            torch.tensor([0, 1]), fallback=False)
    with pytest.raises(ValueError, match="kind"):
        run(mlp(), (x,), y, kind="bogus")
    with pytest.raises(ValueError, match="max_exact_columns"):
        run(mlp(5, 7, 3), (x,), y, kind="exact", max_exact_columns=2)
    with pytest.raises(TypeError, match="output_transform"):
        class Pair(nn.Module):
            def __init__(self):
                super().__init__()
                self.l = nn.Linear(5, 3)

            def forward(self, x):
                return self.l(x), x
        run(Pair(), (x,), y)


def test_broadcast_positional_embedding_goes_to_caller():
    class Pos(nn.Module):
        def __init__(self):
            super().__init__()
            self.item = nn.Embedding(6, 4)
            self.pos = nn.Embedding(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, idx):
            h = self.item(idx) + self.pos(torch.arange(idx.shape[1]))  # [L, D] broadcast over the batch
            return self.head(torch.tanh(h).sum(1))

    m = Pos()
    idx, y = torch.randint(0, 6, (5, 3)), torch.randint(0, 2, (5,))
    res = run(m, (idx,), y, size=5)
    assert res.param_paths["pos.weight"] == "functorch@<root>"
    assert res.param_paths["item.weight"] == "embedding@item"
    assert_close(res.fisher, brute_empirical(m, (idx,), y, get_likelihood("categorical")))


def test_module_called_more_often_than_in_the_trace_is_an_error():
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            for _ in range(int(x.shape[0] > 4) + 1):  # 1 call for small batches, 2 for large ones
                x = torch.tanh(self.lin(x))
            return x

    x, y = torch.randn(9, 3), torch.randint(0, 3, (9,))
    with pytest.raises(ValueError, match="more than once in this forward"):
        diagonal_fisher(Loop(), [(x[:4], y[:4]), (x, y)], progress=False)


@pytest.mark.parametrize("micro", [1, 3, "auto"])
def test_micro_batches_are_exact_and_count_whole_batches(micro, monkeypatch):
    import fishertune.fisher.estimators as est

    monkeypatch.setattr(est, "CPU_OUTPUT_BUDGET", 2)  # "auto" must split these tiny outputs (3 per sample)
    m = SeqModel()
    idx = torch.randint(0, 7, (9, 6))
    y = torch.randint(0, 3, (9,))
    whole = run(m, (idx,), y, size=8, micro_batch=None)
    res = run(m, (idx,), y, size=8, micro_batch=micro)
    assert res.n_batches == whole.n_batches == 2 and res.n_samples == 9
    assert_close(res.fisher, whole.fisher)
    assert_close(res.fisher, brute_empirical(m, (idx,), y, get_likelihood("categorical")))


def test_micro_batch_rejects_bad_values():
    with pytest.raises(ValueError, match="micro_batch"):
        run(SeqModel(), (torch.randint(0, 7, (4, 6)),), torch.randint(0, 3, (4,)), micro_batch=0)


def test_empty_batches_are_ignored():
    m = SeqModel()
    idx, y = torch.randint(0, 7, (5, 6)), torch.randint(0, 3, (5,))
    loader = [((idx[:0],), y[:0]), ((idx,), y), ((idx[:0],), y[:0])]
    res = diagonal_fisher(m, loader, progress=False)
    assert res.n_samples == 5 and res.n_batches == 1
    assert_close(res.fisher, brute_empirical(m, (idx,), y, get_likelihood("categorical")))
