"""Which path computes each parameter's per-sample gradients, decided by tracing one forward pass.

The trace records, for every selected parameter, the stack of module calls active at each operation
that used it (through a ``TorchFunctionMode``), and how often each module was called. Then:

- a parameter used only inside its owner's forward, whose owner has a rule (Linear, Embedding, Conv,
  norms) -> that rule (``multi_call`` when the owner ran more than once per forward: per-sample
  gradients are then summed over the calls before squaring);
- used only inside its owner's forward but no rule -> the ``torch.func`` path on the owner;
- used outside its owner's forward (tied weights such as an output layer that reuses the item
  embedding, ``nn.MultiheadAttention``'s ``out_proj`` which is called functionally, parameters used
  directly in a parent's ``forward``) -> the ``torch.func`` path on the innermost module whose call
  encloses every use.

So tied and shared parameters are exact, never silently half-counted.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from fishertune.fisher.hooks import Rule, find_rule


class UnsupportedModuleError(ValueError):
    """A parameter needs the torch.func fallback but it is disabled, or the mode cannot handle it."""


@dataclass
class Handler:
    """One hooked module and the parameters (local name -> global name) it computes."""

    module_name: str
    module: nn.Module
    path: str  # rule kind ("linear", "embedding", ...) or "functorch"
    rule: Rule | None
    names: dict[str, str]
    multi_call: bool = False
    reason: str = ""


@dataclass
class Plan:
    handlers: list[Handler]
    unused: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def paths(self) -> dict[str, list[str]]:
        """Path -> module names that use it (for the report)."""
        out: dict[str, list[str]] = defaultdict(list)
        for h in self.handlers:
            out[h.path].append(h.module_name or "<root>")
        return dict(out)

    def param_paths(self) -> dict[str, str]:
        out = {g: f"{h.path}@{h.module_name or '<root>'}" for h in self.handlers for g in h.names.values()}
        out.update({n: "unused" for n in self.unused})
        return out


class _UseTracer(TorchFunctionMode):
    def __init__(self, param_ids: dict[int, str], stack: list[str]):
        super().__init__()
        self.param_ids = param_ids
        self.stack = stack
        self.uses: dict[str, set[tuple[str, ...]]] = defaultdict(set)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        hit = [self.param_ids[id(t)] for t in tree_leaves((args, kwargs))
               if isinstance(t, Tensor) and id(t) in self.param_ids]
        # a use is an operation whose result depends on the parameter (not .shape, .device, detach())
        if hit and any(isinstance(r, Tensor) and r.requires_grad for r in tree_leaves(result)):
            for name in hit:
                self.uses[name].add(tuple(self.stack))
        return result


@dataclass
class Trace:
    uses: dict[str, set[tuple[str, ...]]]  # parameter -> module-call stacks at its uses
    calls: dict[str, int]  # module -> number of calls in one forward
    lead: dict[str, set[int]] = field(default_factory=dict)  # module -> leading sizes of its first input


def trace_uses(model: nn.Module, params: dict[str, nn.Parameter], run_forward: Callable[[], object]) -> Trace:
    """Run one forward; record parameter uses, module call counts and input leading sizes."""
    names = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    stack: list[str] = []
    calls: dict[str, int] = defaultdict(int)
    lead: dict[str, set[int]] = defaultdict(set)
    handles = []

    def pre(module, args):
        name = names.get(id(module))
        if name is not None:
            stack.append(name)
            calls[name] += 1
            if args and isinstance(args[0], Tensor) and args[0].dim() > 0:
                lead[name].add(int(args[0].shape[0]))

    def post(module, args, output):
        if names.get(id(module)) is not None and stack:
            stack.pop()

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    tracer = _UseTracer({id(p): n for n, p in params.items()}, stack)
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}  # e.g. BatchNorm running stats
    try:
        with torch.enable_grad(), tracer:
            run_forward()
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for k, b in model.named_buffers():
                if k in buffers:
                    b.copy_(buffers[k])
    return Trace(dict(tracer.uses), dict(calls), dict(lead))


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _broadcast(rule: Rule | None, name: str, trace: Trace, batch_size: int | None, token_level: bool) -> bool:
    """Whether a rule module was called on an input whose dimension 0 is not the sample dimension."""
    return (rule is not None and rule.checks_lead and not token_level and batch_size is not None
            and any(n != batch_size for n in trace.lead.get(name, ())))


def _common_prefix(seqs: list[tuple[str, ...]]) -> tuple[str, ...]:
    out: list[str] = []
    for items in zip(*seqs):
        if all(x == items[0] for x in items):
            out.append(items[0])
        else:
            break
    return tuple(out)


def build_plan(model: nn.Module, params: dict[str, nn.Parameter], trace: Trace, batch_size: int | None = None,
               fallback: bool = True, token_level: bool = False) -> Plan:
    """Assign every selected parameter to a handler (see the module docstring). A rule module whose
    input has no sample dimension (e.g. ``pos_emb(arange(L))`` broadcast over the batch) cannot give
    per-sample gradients from its own output gradient: its parameters go to the torch.func path of
    the module that calls it."""
    uses, calls = trace.uses, trace.calls
    modules = dict(model.named_modules())
    rule_groups: dict[str, dict[str, str]] = defaultdict(dict)
    func_groups: dict[str, dict[str, str]] = defaultdict(dict)
    reasons: dict[str, str] = {}
    unused: list[str] = []
    for gname, p in params.items():
        stacks = uses.get(gname)
        if not stacks:
            unused.append(gname)
            continue
        owner = _owner(gname)
        local = gname[len(owner) + 1:] if owner else gname
        module = modules[owner]
        inside = all(owner in st for st in stacks)
        rule = find_rule(module)
        why = rule.unsupported(module) if rule is not None else None
        broadcast = _broadcast(rule, owner, trace, batch_size, token_level)
        if rule is not None and calls.get(owner, 0) > 1 and not rule.multi_call_ok:
            why = why or f"{type(module).__name__} called more than once per forward"
        if inside and rule is not None and why is None and not broadcast and local in rule.params(module):
            rule_groups[owner][local] = gname
            continue
        # a rule of the innermost enclosing call may claim it (nn.MultiheadAttention's out_proj)
        lcp = _common_prefix(list(stacks))
        m = lcp[-1] if lcp else ""
        prefix = m + "." if m else ""
        mrule = find_rule(modules[m])
        rel = gname[len(prefix):]
        if (m != owner and mrule is not None and gname.startswith(prefix) and rel in mrule.params(modules[m])
                and mrule.unsupported(modules[m]) is None and (calls.get(m, 0) <= 1 or mrule.multi_call_ok)
                and not _broadcast(mrule, m, trace, batch_size, token_level)):
            rule_groups[m][rel] = gname
            continue
        if inside and broadcast:
            enclosing = _common_prefix([st[:st.index(owner)] for st in stacks]) or ("",)
            why = (f"{owner} is called on an input without the sample dimension "
                   f"(leading sizes {sorted(trace.lead[owner])}, batch {batch_size})")
        elif inside:
            enclosing = (owner,)
            why = why or f"no rule for {type(module).__name__}"
        else:
            enclosing = _common_prefix(list(stacks)) or ("",)
            why = f"{gname} is used outside {owner or '<root>'}.forward"
        # the innermost module call that encloses every use and holds the parameter
        target = next((m for m in reversed(enclosing) if id(p) in {id(q) for q in modules[m].parameters()}), "")
        reasons.setdefault(target, why)
        prefix = target + "." if target else ""
        func_groups[target][gname[len(prefix):]] = gname
    handlers: list[Handler] = []
    warnings: list[str] = []
    for mname, names in rule_groups.items():
        module = modules[mname]
        rule = find_rule(module)
        assert rule is not None
        h = Handler(mname, module, rule.kind, rule, names, multi_call=calls.get(mname, 0) > 1)
        if getattr(rule, "uses_batch_stats", None) and rule.uses_batch_stats(module):
            warnings.append(f"{mname}: batch norm in train mode couples samples; its Fisher treats the batch "
                            "statistics as constants (approximate). Use model.eval() for the exact value.")
        handlers.append(h)
    for mname, names in func_groups.items():
        module = modules[mname]
        handlers.append(Handler(mname, module, "functorch", None, names,
                                multi_call=calls.get(mname, 0) > 1, reason=reasons.get(mname, "")))
    plan = Plan(handlers, unused, warnings)
    _validate(plan, fallback, token_level)
    return plan


def _validate(plan: Plan, fallback: bool, token_level: bool) -> None:
    func = [h for h in plan.handlers if h.path == "functorch"]
    if func and not fallback:
        lines = [f"  {h.module_name or '<root>'} ({type(h.module).__name__}): {', '.join(h.names.values())}"
                 f" [{h.reason}]" for h in func]
        raise UnsupportedModuleError("these parameters need the torch.func fallback, which is disabled "
                                     "(fallback=False):\n" + "\n".join(lines))
    if token_level:
        bad = [h for h in plan.handlers if h.path == "functorch" or not h.rule.positional or h.multi_call]
        if bad:
            lines = [f"  {h.module_name or '<root>'} ({type(h.module).__name__}, "
                     f"{'called more than once' if h.multi_call else h.path})" for h in bad]
            raise UnsupportedModuleError(
                "token_level=True needs position-wise layers (Linear, Embedding, LayerNorm, RMSNorm) each "
                "called once per forward; these modules are not:\n" + "\n".join(lines))
