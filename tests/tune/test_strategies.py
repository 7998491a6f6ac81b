"""Strategy configs, freeze rules and the trainable report (fishertune.tune.strategies)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fishertune.config import ConfigError
from fishertune.tune.strategies import (
    PRESETS,
    Rule,
    StrategyConfig,
    apply,
    depth_units,
    expand_pattern,
    fish_masks,
    fishertune_config,
    get_strategy,
    model_roles,
    narrow_report,
    select_rule,
)
from fishertune.zoo.cifar_resnet import GROUPS, CifarResNet


@pytest.fixture(scope="module")
def resnet() -> CifarResNet:
    torch.manual_seed(0)
    return CifarResNet(20)


def _random_fisher(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}


# --- configs -----------------------------------------------------------------------------------------

def test_unknown_keys_are_errors_naming_them() -> None:
    with pytest.raises(ConfigError, match="unknown key 'rulez'"):
        get_strategy({"name": "x", "rulez": []})
    with pytest.raises(ConfigError, match="unknown key 'rules.0.selct'"):
        get_strategy({"rules": [{"selct": ["head"]}]})
    with pytest.raises(ConfigError, match="unknown key 'bn_adapt.alfa'"):
        get_strategy("bn_adapt", {"bn_adapt": {"alfa": 0.5}})
    with pytest.raises(ConfigError, match="unknown strategy 'head_onyl'"):
        get_strategy("head_onyl")
    with pytest.raises(ConfigError, match="'bn_adapt.alpha'"):
        get_strategy("bn_adapt", {"bn_adapt": {"alpha": 2.0}})


def test_presets_serialise_round_trip() -> None:
    for name in PRESETS:
        s = get_strategy(name)
        assert s.name == name
        again = get_strategy(s.model_dump(mode="json"))
        assert again == s
    combo = get_strategy({"base": "bn_adapt_head", "name": "mine", "bn_adapt": {"alpha": 0.3}})
    assert combo.name == "mine" and combo.bn_adapt.alpha == 0.3 and combo.rules[0].select == ["head"]


# --- patterns ----------------------------------------------------------------------------------------

def test_expand_range() -> None:
    assert expand_pattern("layer1..3") == ["layer1", "layer2", "layer3"]
    assert expand_pattern("stage2..2") == ["stage2"]
    assert expand_pattern("encoder.*") == ["encoder.*"]
    with pytest.raises(ConfigError, match="empty range"):
        expand_pattern("layer3..1")


def _params(model, **rule) -> list[str]:
    return select_rule(model, Rule(**rule))


def test_patterns_select_exactly_the_intended_resnet_parameters(resnet: CifarResNet) -> None:
    names = [n for n, _ in resnet.named_parameters()]
    assert _params(resnet, select=["stem"]) == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert _params(resnet, select=["head"]) == ["linear.weight", "linear.bias"]
    for i in (1, 2, 3):
        expect = [n for n in names if n.startswith(f"layer{i}.")]
        assert _params(resnet, select=[f"layer{i}"]) == expect
        assert _params(resnet, select=[f"stage{i}"]) == expect
    assert _params(resnet, select=["layer1..3"]) == [n for n in names if n.startswith("layer")]
    assert _params(resnet, select=["decoder"]) == [n for n in names if n.startswith("layer3.")]
    # every role of GROUPS, and together they cover each parameter once
    covered = [p for role in GROUPS for p in _params(resnet, select=[role])]
    assert sorted(covered) == sorted(names)
    assert _params(resnet, select=["re:layer3\\.\\d+\\.bn2"]) == [
        n for n in names if n.startswith("layer3.") and ".bn2." in n]
    assert _params(resnet, select=["layer2.*.conv1"]) == [f"layer2.{i}.conv1.weight" for i in range(3)]
    assert _params(resnet, types=["batchnorm"]) == [n for n in names if "bn" in n]
    assert _params(resnet, types=["BatchNorm2d"]) == [n for n in names if "bn" in n]
    assert _params(resnet, types=["conv"]) == [n for n in names if "conv" in n]
    assert _params(resnet, params="bias") == [n for n in names if n.endswith(".bias")]
    assert _params(resnet, select=["layer1..3"], exclude=["layer2"], params="weight", types=["norm"]) == [
        n for n in names if n.startswith(("layer1.", "layer3.")) and ".bn" in n and n.endswith("weight")]
    # "layer1" never matches a hypothetical "layer10": prefixes stop at dots
    assert all(n.startswith("layer1.") for n in _params(resnet, select=["layer1"]))


def test_pattern_selecting_nothing_is_an_error(resnet: CifarResNet) -> None:
    with pytest.raises(ConfigError, match="'encoder.\\*' selects no module.*roles"):
        _params(resnet, select=["encoder.*"])
    with pytest.raises(ConfigError, match="unknown module type 'battchnorm'"):
        _params(resnet, types=["battchnorm"])


def _transformers():
    try:
        from fishertune.zoo.minilm import _hide_broken_torchvision
        _hide_broken_torchvision()
    except ImportError:
        pass
    return pytest.importorskip("transformers")


@pytest.mark.slow  # importing transformers takes ~10 s
def test_patterns_on_a_transformer_encoder() -> None:
    transformers = _transformers()
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=3, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16)

    class Clf(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = transformers.BertModel(cfg, add_pooling_layer=False)
            self.head = nn.Linear(8, 2)

    model = Clf()
    names = [n for n, _ in model.named_parameters()]
    roles = model_roles(model)
    assert roles["head"] == ("head",) and roles["decoder"] == ("body.encoder.layer.2",)
    assert roles["encoder"] == ("body.encoder",) and roles["embeddings"] == ("body.embeddings",)
    enc = _params(model, select=["encoder.*"])
    assert enc == [n for n in names if n.startswith("body.encoder.")]
    assert _params(model, select=["layer0..1"]) == [n for n in names if n.startswith(("body.encoder.layer.0.",
                                                                                        "body.encoder.layer.1."))]
    assert _params(model, select=["decoder", "head"]) == [n for n in names if n.startswith(
        ("body.encoder.layer.2.", "head."))]
    assert _params(model, types=["layernorm"]) == [n for n in names if "LayerNorm" in n]
    units = depth_units(model)
    assert units[0] == "body.embeddings" and units[-1] == "head" and len(units) == 5


@pytest.mark.slow
def test_patterns_on_minilm_if_available() -> None:
    _transformers()
    from fishertune.tune.finetune import TextClassifier
    try:
        model = TextClassifier.from_minilm(num_classes=2)
    except (FileNotFoundError, ImportError, OSError) as exc:  # pragma: no cover - depends on the install
        pytest.skip(f"MiniLM not loadable: {exc}")
    names = [n for n, _ in model.named_parameters()]
    roles = model_roles(model)
    assert "head" in roles and "decoder" in roles
    enc = _params(model, select=["encoder.*"])
    assert enc and all(".encoder." in f".{n}" for n in enc)
    dec = _params(model, select=["decoder"])
    assert dec and all(n.startswith(roles["decoder"][0] + ".") for n in dec)
    head = _params(model, select=["head"])
    assert head and set(head) <= set(names) and not set(head) & set(enc)


# --- apply and the report ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_report_adds_up_and_sets_requires_grad(resnet: CifarResNet, name: str) -> None:
    strat = get_strategy(name)
    fisher = _random_fisher(resnet) if strat.fish_mask else None
    rep = apply(resnet, strat, fisher=fisher)
    params = dict(resnet.named_parameters())
    assert rep.total == sum(p.numel() for p in params.values())
    assert sum(t for t, _ in rep.per_module.values()) == rep.trainable
    assert sum(tot for _, tot in rep.per_module.values()) == rep.total
    expect = sum(int(rep.masks[n].sum()) if n in rep.masks else p.numel()
                 for n, p in params.items() if p.requires_grad)
    assert rep.trainable == expect
    assert set(rep.params) == {n for n, p in params.items() if p.requires_grad}
    assert sum(rep.per_role[r][0] for r in GROUPS) == rep.trainable
    assert sum(rep.per_role[r][1] for r in GROUPS) == rep.total
    assert 0 <= rep.share <= 1 and rep.summary().startswith(name)
    assert rep.to_dict()["trainable"] == rep.trainable


def test_specific_counts_by_hand(resnet: CifarResNet) -> None:
    assert apply(resnet, "head_only").trainable == 64 * 10 + 10
    bn = sum(m.weight.numel() * 2 for m in resnet.modules() if isinstance(m, nn.BatchNorm2d))
    assert apply(resnet, "norm_only").trainable == bn + 650
    assert apply(resnet, "bitfit").trainable == bn // 2 + 650
    assert apply(resnet, "bn_adapt").trainable == 0
    later = get_strategy({"rules": [{"select": []}, {"select": ["stem"], "trainable": False}]})
    assert apply(resnet, later).trainable == 269_722 - 464


def test_fish_mask_keeps_exact_top_share(resnet: CifarResNet) -> None:
    fisher = _random_fisher(resnet)
    strat = get_strategy("fish_mask", {"fish_mask": {"keep": 0.01}})
    rep = apply(resnet, strat, fisher=fisher)
    cand = {n: f for n, f in fisher.items() if not n.startswith("linear.")}
    k = round(0.01 * sum(f.numel() for f in cand.values()))
    assert rep.trainable == k + 650
    thr = torch.cat([f.reshape(-1) for f in cand.values()]).topk(k).values.min()
    for n, m in rep.masks.items():
        assert bool((fisher[n][m] >= thr).all()) and bool((fisher[n][~m] <= thr).all())
    with pytest.raises(ValueError, match="needs fisher="):
        apply(resnet, strat)


def test_fish_masks_by_hand() -> None:
    f = {"a": torch.tensor([0.1, 5.0, 0.3]), "b": torch.tensor([[4.0, 0.0], [0.2, 3.0]])}
    m = fish_masks(f, keep=3 / 7)
    assert m["a"].tolist() == [False, True, False]
    assert m["b"].tolist() == [[True, False], [False, True]]


def test_layer_decay_scales(resnet: CifarResNet) -> None:
    rep = apply(resnet, get_strategy("layerwise_lr_decay", {"layer_decay": 0.5}))
    units = depth_units(resnet)
    depth = len(units) - 1
    assert rep.lr_scale["linear.weight"] == 1.0
    assert rep.lr_scale["layer3.2.conv1.weight"] == 0.5
    assert rep.lr_scale["layer1.0.bn2.bias"] == pytest.approx(0.5 ** (depth - units.index("layer1.0")))
    assert rep.lr_scale["conv1.weight"] == pytest.approx(0.5 ** depth)


def test_strategy_flags() -> None:
    assert not get_strategy("bn_adapt").uses_labels and get_strategy("bn_adapt").uses_unlabelled
    assert get_strategy("self_train").uses_unlabelled and get_strategy("head_only").uses_labels
    assert not get_strategy("l2sp").uses_unlabelled and get_strategy("ewc").uses_unlabelled
    assert isinstance(get_strategy(StrategyConfig(name="z")), StrategyConfig)


# --- the fishertune strategy -------------------------------------------------------------------------

def test_fishertune_strategy_config() -> None:
    strat = get_strategy("fishertune")
    assert strat.uses_labels and not strat.uses_unlabelled and strat.rules
    assert fishertune_config(strat.fishertune).fishertune_warmup == 2
    assert get_strategy(strat.model_dump()) == strat             # round trip
    with pytest.raises(ConfigError, match="fishertune needs rules"):
        get_strategy({"name": "x", "fishertune": {}})
    with pytest.raises(ConfigError, match="fishertune and fish_mask both"):
        get_strategy("fishertune", {"fish_mask": {"keep": 0.1}})
    with pytest.raises(ValueError, match="unknown key .warmup."):   # pydantic ValidationError
        StrategyConfig(name="y", rules=[Rule()], fishertune={"warmup": 1})
    with pytest.raises(ConfigError, match="'specific_weight_decay' is set by the small-data recipe"):
        fishertune_config({"specific_weight_decay": 0.1})
    with pytest.raises(ConfigError, match="expected a mapping"):
        fishertune_config([1])   # type: ignore[arg-type]


def test_narrow_report_counts(resnet: CifarResNet) -> None:
    rep = apply(resnet, "full_low_lr")
    params = dict(resnet.named_parameters())
    half = torch.zeros_like(params["conv1.weight"], dtype=torch.bool)
    half.view(-1)[: half.numel() // 2] = True
    selected = {"conv1.weight": half, "bn1.weight": torch.zeros_like(params["bn1.weight"], dtype=torch.bool),
                "bn1.bias": torch.ones_like(params["bn1.bias"], dtype=torch.bool)}
    out = narrow_report(resnet, rep, selected)
    assert "bn1.weight" not in out.params and "bn1.bias" in out.params and "bn1.bias" not in out.masks
    assert torch.equal(out.masks["conv1.weight"], half)
    assert out.trainable == rep.trainable - params["conv1.weight"].numel() // 2 - params["bn1.weight"].numel()
    assert sum(t for t, _ in out.per_module.values()) == out.trainable
    assert out.per_role["stem"][0] == half.numel() // 2 + params["bn1.bias"].numel()
    with pytest.raises(ValueError, match="not trainable"):
        narrow_report(resnet, apply(resnet, "head_only"), selected)
