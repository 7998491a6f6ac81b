"""Brute-force references for the Fisher engine tests: plain Python loops over single samples
(imported as ``brute``: a unique module name, so it resolves whichever test directories a run collects)."""

from __future__ import annotations

import torch


def named_trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def brute_empirical(model, inputs, target, lik, token_level=False):
    """(1/N) sum_i g_i^2 by a loop over samples (and over tokens with token_level)."""
    params = named_trainable(model)
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    B = target.shape[0]
    count = 0
    for i in range(B):
        out = model(*(x[i:i + 1] for x in inputs))
        losses, _ = lik.nll(out, target[i:i + 1], token_level)
        units = losses.reshape(-1)
        for u in range(units.numel()) if token_level else [None]:
            loss = units.sum() if u is None else units[u]
            if u is not None and not _valid(lik, target[i:i + 1], u):
                continue
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)
            for (n, _), g in zip(params.items(), grads):
                if g is not None:
                    acc[n] += g ** 2
            count += 1
    return {n: v / count for n, v in acc.items()}


def _valid(lik, target, u):
    ignore = getattr(lik, "ignore_index", None)
    if ignore is None:
        return True
    return bool(target.reshape(-1)[u] != ignore)


def brute_ggn_diag(model, inputs, target, lik):
    """diag(J^T H J) per sample, H = Hessian of the NLL wrt the output (for these likelihoods it is the
    output-space Fisher), averaged over samples. Full Jacobians, loop over samples."""
    params = named_trainable(model)
    names = list(params)
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    B = target.shape[0]
    for i in range(B):
        xi = tuple(x[i:i + 1] for x in inputs)
        yi = target[i:i + 1]

        def f(*flat):
            from torch.func import functional_call
            return functional_call(model, dict(zip(names, flat)), xi)

        out = f(*params.values()).detach()
        H = torch.autograd.functional.hessian(lambda o: lik.nll(o, yi)[0].sum(), out)
        H = H.reshape(out.numel(), out.numel())
        J = torch.autograd.functional.jacobian(f, tuple(params.values()))
        for n, Jn in zip(names, J):
            Jm = Jn.reshape(out.numel(), -1)
            acc[n] += torch.einsum("op,oq,qp->p", Jm, H, Jm).reshape(params[n].shape)
    return {n: v / B for n, v in acc.items()}


def assert_close(got, want, rtol=1e-7, atol=1e-10):
    assert set(got) == set(want), (set(got), set(want))
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n].double(), rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")
