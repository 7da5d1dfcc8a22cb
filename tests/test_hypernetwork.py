"""Hypernetworks (docs/a1111-rules.md, "Hypernetworks"): module layout, every file era, the attention hook, prompt
tags."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import UserError
from utils.hypernetwork import (
    Hypernetwork,
    HypernetworkAttnProcessor,
    HypernetworkModule,
    HypernetworkOptions,
    HypernetworkTrainingModule,
    apply_hypernetworks,
    attention_context_widths,
    hypernetwork_to_a1111_dict,
    install_hypernetworks,
    list_hypernetworks,
    load_hypernetwork,
    load_optimizer_sidecar,
    parse_dropout_structure,
    parse_hypernet_tags,
    parse_layer_structure,
    remove_hypernetworks,
    save_hypernetwork,
    save_hypernetwork_safetensors,
)


def _layout(module: HypernetworkModule) -> list[tuple[int, str]]:
    return [(i, type(m).__name__) for i, m in enumerate(module.linear)]


def _randomise(hn: Hypernetwork, seed: int = 0) -> Hypernetwork:
    # Default init leaves outputs ~= inputs; random weights make output comparisons meaningful.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return hn


# ---------------------------------------------------------------------------------------------------------- module


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(layer_structure=[1, 2, 1]), [(0, "Linear"), (1, "Linear")]),
        (
            dict(layer_structure=[1, 2, 1], activation_func="linear", activate_output=True),
            [(0, "Linear"), (1, "Linear")],
        ),
        (dict(layer_structure=[1, 2, 1], activation_func="relu"), [(0, "Linear"), (1, "ReLU"), (2, "Linear")]),
        (
            dict(layer_structure=[1, 2, 1], activation_func="relu", add_layer_norm=True),
            [(0, "Linear"), (1, "ReLU"), (2, "LayerNorm"), (3, "Linear"), (4, "LayerNorm")],
        ),
        (
            dict(layer_structure=[1, 2, 1], activation_func="swish", activate_output=True),
            [(0, "Linear"), (1, "Hardswish"), (2, "Linear"), (3, "Hardswish")],
        ),
        (
            dict(layer_structure=[1, 2, 2, 1], activation_func="leakyrelu", dropout_structure=[0, 0.3, 0.3, 0]),
            [(0, "Linear"), (1, "LeakyReLU"), (2, "Dropout"), (3, "Linear"), (4, "LeakyReLU"), (5, "Dropout"),
             (6, "Linear")],
        ),
    ],
)
def test_sequential_indices_match_a1111(kwargs, expected):
    module = HypernetworkModule(8, **kwargs)
    assert _layout(module) == expected
    linear_idx = [i for i, name in expected if name in ("Linear", "LayerNorm")]
    assert list(module.state_dict()) == [f"linear.{i}.{p}" for i in linear_idx for p in ("weight", "bias")]


def test_relu_layernorm_example_keys_and_shapes():
    sd = HypernetworkModule(8, [1, 2, 1], "relu", add_layer_norm=True).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "linear.0.weight": (16, 8), "linear.0.bias": (16,), "linear.2.weight": (16,), "linear.2.bias": (16,),
        "linear.3.weight": (8, 16), "linear.3.bias": (8,), "linear.4.weight": (8,), "linear.4.bias": (8,),
    }


def test_fractional_structure_widths():
    module = HypernetworkModule(10, [1, 1.5, 0.25, 1])
    assert [(m.in_features, m.out_features) for m in module.linear] == [(10, 15), (15, 2), (2, 10)]


def test_parse_dropout_structure_examples():
    assert parse_dropout_structure([1, 2, 1], True, False) == [0, 0, 0]
    assert parse_dropout_structure([1, 2, 1], True, True) == [0, 0.3, 0]
    assert parse_dropout_structure([1, 2, 2, 1], True, False) == [0, 0.3, 0, 0]
    assert parse_dropout_structure([1, 2, 2, 1], True, True) == [0, 0.3, 0.3, 0]
    assert parse_dropout_structure([1, 2, 4, 2, 1], True, False) == [0, 0.3, 0.3, 0, 0]
    assert parse_dropout_structure([1, 2, 2, 1], False, True) == [0, 0, 0, 0]
    assert parse_dropout_structure(None, False, False) == [0, 0, 0]


def test_parse_layer_structure():
    assert parse_layer_structure("1, 2, 1") == [1.0, 2.0, 1.0]
    assert parse_layer_structure("1,1.5,1") == [1.0, 1.5, 1.0]
    with pytest.raises(UserError):
        parse_layer_structure("1, two, 1")
    with pytest.raises(UserError):
        parse_layer_structure("2, 1")


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(layer_structure=[2, 1]), "start and end with 1"),
        (dict(layer_structure=[1, 2]), "start and end with 1"),
        (dict(layer_structure=[1]), "start and end with 1"),
        (dict(activation_func="relu7"), "unsupported hypernetwork activation function 'relu7'"),
        (dict(activation_func="threshold"), "cannot be used"),
        (dict(dropout_structure=[0, 1.5, 0]), "dropout probability 1.5"),
        (dict(dropout_structure=[0, -0.1, 0]), "dropout probability -0.1"),
        (dict(dropout_structure=[0, 0.1]), "as many entries"),
        (dict(weight_init="Uniform"), "unknown hypernetwork weight init 'Uniform'"),
    ],
)
def test_invalid_module_options_are_one_line_user_errors(kwargs, needle):
    with pytest.raises(UserError) as e:
        HypernetworkModule(8, **kwargs)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_the_stdlib_activation_list_is_the_torch_table():
    """train_hypernetwork.py checks --activation_func against utils/hypernetwork_options.py before torch loads: that
    list must be exactly the names utils/hypernetwork.py can build, and the rest of torch's table refused."""
    from utils import hypernetwork_options
    from utils.hypernetwork import _activation_table

    buildable, needs_arguments = set(), set()
    for name, cls in _activation_table().items():
        try:
            cls()
            buildable.add(name)
        except TypeError:
            needs_arguments.add(name)
    assert set(hypernetwork_options.ACTIVATION_NAMES) == buildable
    assert set(hypernetwork_options.ACTIVATIONS_NEEDING_ARGUMENTS) == needs_arguments
    for name in buildable:
        HypernetworkModule(8, activation_func=name)


def test_init_rules():
    torch.manual_seed(0)
    m = HypernetworkModule(256, [1, 2, 1], "relu", "Normal", add_layer_norm=True)
    linears = [x for x in m.linear if isinstance(x, nn.Linear)]
    norms = [x for x in m.linear if isinstance(x, nn.LayerNorm)]
    for layer in linears + norms:
        assert torch.count_nonzero(layer.bias) == 0
    assert abs(linears[0].weight.std().item() - 0.01) < 0.001
    torch.manual_seed(0)
    m = HypernetworkModule(256, [1, 2, 1], "relu", "XavierUniform", add_layer_norm=True)
    lin = [x for x in m.linear if isinstance(x, nn.Linear)][0]
    bound = (6 / (256 + 512)) ** 0.5
    assert lin.weight.abs().max().item() <= bound and lin.weight.abs().max().item() > 0.95 * bound
    # LayerNorm always gets Normal init (weights ~0, not 1) whatever the option
    for norm in (x for x in m.linear if isinstance(x, nn.LayerNorm)):
        assert norm.weight.abs().max().item() < 0.06
        assert torch.count_nonzero(norm.bias) == 0
    torch.manual_seed(0)
    m = HypernetworkModule(256, [1, 2, 1], "relu", "KaimingNormal")
    w = m.linear[0].weight
    assert abs(w.std().item() - (2 / 256) ** 0.5) < 0.005
    m = HypernetworkModule(256, [1, 2, 1], "relu", "XavierNormal")
    assert abs(m.linear[0].weight.std().item() - (2 / (256 + 512)) ** 0.5) < 0.003


def test_forward_residual_and_multiplier():
    torch.manual_seed(1)
    m = HypernetworkModule(8, [1, 2, 1], "relu", "XavierNormal", dropout_structure=[0, 0.5, 0])
    x = torch.randn(2, 3, 8)
    m.eval()
    delta = m.linear(x)
    m.multiplier = 0.25
    assert torch.allclose(m(x), x + delta * 0.25)
    assert torch.allclose(m(x, multiplier=-2.0), x + delta * -2.0)
    assert torch.equal(m(x, multiplier=0.0), x)
    m.train()  # training ignores the multiplier; dropout is live
    torch.manual_seed(5)
    out = m(x, multiplier=0.0)
    torch.manual_seed(5)
    assert torch.allclose(out, x + m.linear(x))
    assert not torch.allclose(out, x + delta)  # dropout changed something


def test_container_modes_and_multiplier():
    hn = Hypernetwork.create("h", [8, 16], HypernetworkOptions(activation_func="relu"))
    assert sorted(hn.layers) == [8, 16]
    assert len(hn.parameters()) == 4 * 4
    assert all(not p.requires_grad for p in hn.parameters()) and all(not m.training for m in hn.modules())
    hn.train()
    assert all(p.requires_grad for p in hn.parameters()) and all(m.training for m in hn.modules())
    hn.eval().set_multiplier(0.5)
    assert all(m.multiplier == 0.5 for m in hn.modules())
    assert hn.options.dropout_structure == [0, 0, 0]
    assert hn.shorthash is None


# ---------------------------------------------------------------------------------------------------------- files

ACTIVATION_NAMES = [None, "linear", "relu", "swish", "leakyrelu", "elu", "tanh"]
GRID = list(
    itertools.product(
        [[1.0, 2.0, 1.0], [1.0, 1.5, 1.0], [1.0, 2.0, 2.0, 1.0]],
        ACTIVATION_NAMES,
        [False, True],  # layer norm
        [(False, False), (True, False), (True, True)],  # use_dropout, last_layer_dropout
        [False, True],  # activate_output
    )
)


def _same_state(a: Hypernetwork, b: Hypernetwork) -> None:
    assert sorted(a.layers) == sorted(b.layers)
    for dim in a.layers:
        for ma, mb in zip(a.layers[dim], b.layers[dim]):
            sa, sb = ma.state_dict(), mb.state_dict()
            assert list(sa) == list(sb)
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
            assert _layout(ma) == _layout(mb)


def _same_outputs(a: Hypernetwork, b: Hypernetwork, multiplier: float = 0.7) -> None:
    a.eval().set_multiplier(multiplier)
    b.eval().set_multiplier(multiplier)
    for dim in a.layers:
        x = torch.randn(2, 5, dim, generator=torch.Generator().manual_seed(dim))
        for ma, mb in zip(a.layers[dim], b.layers[dim]):
            assert torch.equal(ma(x), mb(x))
            assert not torch.allclose(ma(x), x)


def test_round_trip_grid(tmp_path):
    for n, (structure, act, norm, (use_do, last_do), act_out) in enumerate(GRID):
        opts = HypernetworkOptions(
            layer_structure=structure, activation_func=act, is_layer_norm=norm, weight_initialization="XavierNormal",
            activate_output=act_out, use_dropout=use_do, last_layer_dropout=last_do, optional_info=f"grid {n}",
        )
        hn = _randomise(Hypernetwork.create(f"grid{n}", [8], opts), seed=n)
        hn.step, hn.sd_checkpoint, hn.sd_checkpoint_name = 10 + n, "abcdef0123", "model-a"
        meta = {k: v for k, v in hypernetwork_to_a1111_dict(hn).items() if isinstance(k, str)}
        for path in (tmp_path / f"g{n}.pt", tmp_path / f"g{n}.safetensors"):
            if path.suffix == ".pt":
                save_hypernetwork(hn, path)
            else:
                save_hypernetwork_safetensors(hn, path)
            back = load_hypernetwork(path)
            _same_state(hn, back)
            _same_outputs(hn, back)
            assert back.options == hn.options, (n, path.suffix)
            assert (back.name, back.step, back.sd_checkpoint, back.sd_checkpoint_name) == (
                f"grid{n}", 10 + n, "abcdef0123", "model-a")
            # Saving the loaded one writes the same metadata, in the same order.
            again = {k: v for k, v in hypernetwork_to_a1111_dict(back).items() if isinstance(k, str)}
            assert list(again.items()) == list(meta.items())


def test_saved_pt_has_current_a1111_layout(tmp_path):
    opts = HypernetworkOptions(layer_structure=[1, 2, 2, 1], activation_func="relu", use_dropout=True,
                               last_layer_dropout=True)
    hn = Hypernetwork.create("style", [16, 8], opts)
    hn.step = 42
    path = save_hypernetwork(hn, tmp_path / "style-42.pt")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert list(raw) == [16, 8, "step", "name", "layer_structure", "activation_func", "is_layer_norm",
                         "weight_initialization", "sd_checkpoint", "sd_checkpoint_name", "activate_output",
                         "use_dropout",
                         "dropout_structure", "last_layer_dropout", "optional_info"]
    assert isinstance(raw[16], tuple) and len(raw[16]) == 2
    assert isinstance(raw[16][0], OrderedDict)
    assert list(raw[16][0]) == ["linear.0.weight", "linear.0.bias", "linear.3.weight", "linear.3.bias",
                                "linear.6.weight", "linear.6.bias"]
    assert raw["step"] == 42 and raw["name"] == "style"
    assert raw["dropout_structure"] == [0, 0.3, 0.3, 0] and raw["last_layer_dropout"] is True
    assert raw["activation_func"] == "relu" and raw["activate_output"] is False and raw["optional_info"] is None
    assert not any(n.name.startswith(".") for n in tmp_path.iterdir())  # no temp files left behind


def test_safetensors_layout(tmp_path):
    from safetensors import safe_open

    hn = Hypernetwork.create("st", [8], HypernetworkOptions(activation_func="relu", is_layer_norm=True))
    hn.step = 3
    path = save_hypernetwork_safetensors(hn, tmp_path / "st.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = sorted(f.keys())
        meta = json.loads(f.metadata()["a1111_hypernetwork"])
    assert keys == sorted(f"8.{t}.linear.{i}.{p}" for t in "kv" for i in (0, 2, 3, 4) for p in ("weight", "bias"))
    assert meta["step"] == 3 and meta["layer_structure"] == [1.0, 2.0, 1.0] and meta["is_layer_norm"] is True


def _sd(*layers):
    """OrderedDict of ``name -> Linear`` weights for a hand-built file."""
    out = OrderedDict()
    for name, layer in layers:
        out[f"{name}.weight"] = layer.weight.detach().clone()
        out[f"{name}.bias"] = layer.bias.detach().clone()
    return out


def _lin(i, o, seed):
    torch.manual_seed(seed)
    return nn.Linear(i, o)


def test_novelai_file_int_keys_only_legacy_names(tmp_path):
    dims = (8, 16)
    raw, ref = {}, {}
    for dim in dims:
        pair = []
        for which in range(2):
            l1, l2 = _lin(dim, dim * 2, dim + which), _lin(dim * 2, dim, 100 + dim + which)
            pair.append(_sd(("linear1", l1), ("linear2", l2)))
            ref[(dim, which)] = (l1, l2)
        raw[dim] = pair  # NovelAI used lists
    # fp16 tensors that still require grad, as some old files hold
    for dim in dims:
        for sd in raw[dim]:
            for k in sd:
                sd[k] = sd[k].half().float().requires_grad_(True)
    path = tmp_path / "anime_3.pt"
    torch.save(raw, path)
    hn = load_hypernetwork(path)
    assert (hn.name, hn.step, hn.sd_checkpoint, hn.sd_checkpoint_name) == ("anime_3", 0, None, None)
    o = hn.options
    # No activation key: A1111 loads None, the same network as "linear", which is what we hold and write (ComfyUI
    # refuses a file whose activation is None).
    assert (o.layer_structure, o.activation_func, o.weight_initialization, o.is_layer_norm) == (
        [1, 2, 1], "linear", "Normal", False)
    assert (o.activate_output, o.use_dropout, o.last_layer_dropout, o.dropout_structure) == (
        True, False, False, [0, 0, 0])
    for dim in dims:
        x = torch.randn(3, dim)
        for which in range(2):
            module = hn.layers[dim][which]
            assert _layout(module) == [(0, "Linear"), (1, "Linear")]
            assert module.linear[0].weight.dtype == torch.float32 and not module.linear[0].weight.requires_grad
            l1, l2 = ref[(dim, which)]
            with torch.no_grad():
                expect = x + l2(l1(x))
            assert torch.allclose(module(x), expect, atol=1e-2)  # the file's weights went through fp16


def test_oct_2022_file(tmp_path):
    # Oct 2022: activation after every layer incl. the last, Dropout(0.3) after every layer but the last two.
    structure = [1, 2, 2, 1]
    dim = 8
    raw, ref = {}, {}
    layers_k = [_lin(8, 16, 1), _lin(16, 16, 2), _lin(16, 8, 3)]
    layers_v = [_lin(8, 16, 4), _lin(16, 16, 5), _lin(16, 8, 6)]
    for which, layers in enumerate((layers_k, layers_v)):
        ref[which] = layers
    raw[dim] = (_sd(("linear.0", layers_k[0]), ("linear.3", layers_k[1]), ("linear.5", layers_k[2])),
                _sd(("linear.0", layers_v[0]), ("linear.3", layers_v[1]), ("linear.5", layers_v[2])))
    raw.update(step=1500, name="octnet", layer_structure=structure, activation_func="relu", is_layer_norm=False,
               weight_initialization="Normal", use_dropout=True, sd_checkpoint="7460a6fa",
               sd_checkpoint_name="model")
    torch.save(raw, tmp_path / "octnet-1500.pt")
    hn = load_hypernetwork(tmp_path / "octnet-1500.pt")
    assert (hn.name, hn.step, hn.sd_checkpoint) == ("octnet", 1500, "7460a6fa")
    assert hn.options.activate_output is True and hn.options.use_dropout is True
    assert hn.options.dropout_structure == [0, 0.3, 0, 0]
    module = hn.layers[dim][1]
    assert _layout(module) == [(0, "Linear"), (1, "ReLU"), (2, "Dropout"), (3, "Linear"), (4, "ReLU"), (5, "Linear"),
                               (6, "ReLU")]
    x = torch.randn(4, dim)
    a, b, c = ref[1]
    with torch.no_grad():
        expect = x + F.relu(c(F.relu(b(F.relu(a(x))))))
    assert torch.allclose(module(x), expect, atol=1e-6)


def test_nov_2022_file(tmp_path):
    # Nov 2022: use_dropout + last_layer_dropout flags with p = 0.3, activate_output stored, no dropout_structure.
    dim = 8
    layers = [_lin(8, 16, 7), _lin(16, 16, 8), _lin(16, 8, 9)]
    sd = _sd(("linear.0", layers[0]), ("linear.3", layers[1]), ("linear.6", layers[2]))
    raw = {dim: (sd, sd), "step": 7, "name": "nov", "layer_structure": [1, 2, 2, 1], "activation_func": "swish",
           "is_layer_norm": False, "weight_initialization": "XavierNormal", "use_dropout": True,
           "sd_checkpoint": "925997e9", "sd_checkpoint_name": "sd-v1-4", "activate_output": False,
           "last_layer_dropout": True}
    torch.save(raw, tmp_path / "nov.pt")
    hn = load_hypernetwork(tmp_path / "nov.pt")
    o = hn.options
    assert (o.dropout_structure, o.use_dropout, o.activate_output, o.activation_func) == (
        [0, 0.3, 0.3, 0], True, False, "swish")
    assert (o.weight_initialization, o.optional_info) == ("XavierNormal", None)
    module = hn.layers[dim][0]
    assert _layout(module) == [(0, "Linear"), (1, "Hardswish"), (2, "Dropout"), (3, "Linear"), (4, "Hardswish"),
                               (5, "Dropout"), (6, "Linear")]
    hn.set_multiplier(0.5)
    x = torch.randn(4, dim)
    with torch.no_grad():
        expect = x + layers[2](F.hardswish(layers[1](F.hardswish(layers[0](x))))) * 0.5
    assert torch.allclose(module(x), expect, atol=1e-6)


def test_current_file_dropout_structure_implies_use_dropout(tmp_path):
    hn = Hypernetwork.create("cur", [8], HypernetworkOptions(dropout_structure=[0, 0.1, 0]))
    data = hypernetwork_to_a1111_dict(hn)
    data["use_dropout"] = False  # A1111 trusts a non-zero dropout_structure over the flag
    torch.save(data, tmp_path / "cur.pt")
    back = load_hypernetwork(tmp_path / "cur.pt")
    assert back.options.use_dropout is True and back.options.dropout_structure == [0, 0.1, 0]
    assert _layout(back.layers[8][0]) == [(0, "Linear"), (1, "Dropout"), (2, "Linear")]
    # Stored name wins over the file stem; a missing name falls back to the stem.
    assert back.name == "cur"
    data["name"] = None
    torch.save(data, tmp_path / "renamed.pt")
    assert load_hypernetwork(tmp_path / "renamed.pt").name == "renamed"
    # The init name only matters for new weights: an unknown one (or None, as some 2022 files hold) still loads.
    for init in (None, "Orthogonal"):
        data["weight_initialization"] = init
        torch.save(data, tmp_path / "init.pt")
        loaded = load_hypernetwork(tmp_path / "init.pt")
        _same_state(back, loaded)


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({768: (OrderedDict(), OrderedDict()), "name": _Evil(str(marker))}, path)
    with pytest.raises(UserError) as e:
        load_hypernetwork(path)
    assert str(path) in str(e.value) and "refusing" in str(e.value) and "\n" not in str(e.value)
    assert "io.open" in str(e.value)
    assert not marker.exists()
    # The optimizer sidecar goes through the same guard.
    good = save_hypernetwork(Hypernetwork.create("g", [8]), tmp_path / "g.pt")
    torch.save({"hash": "x", "optimizer_state_dict": _Evil(str(marker))}, str(good) + ".optim")
    with pytest.raises(UserError):
        load_optimizer_sidecar(good)
    assert not marker.exists()


def test_not_hypernetwork_files(tmp_path, a1111_fixtures):
    with pytest.raises(UserError, match="no layers keyed by width"):
        load_hypernetwork(a1111_fixtures / "empty.pt")
    with pytest.raises(UserError, match="no layers keyed by width"):
        load_hypernetwork(a1111_fixtures / "bad-artist.pt")  # a textual-inversion embedding
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(UserError, match=r"junk.pt: not a readable hypernetwork file \(Unsupported operand"):
        load_hypernetwork(junk)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((a1111_fixtures / "bad-artist.pt").read_bytes()[:3000])
    with pytest.raises(UserError, match=r"truncated.pt: not a readable hypernetwork file \(Pytorch"):
        load_hypernetwork(truncated)
    with pytest.raises(UserError, match="not found"):
        load_hypernetwork(tmp_path / "missing.pt")


def test_weights_not_matching_options(tmp_path):
    hn = Hypernetwork.create("m", [8], HypernetworkOptions(activation_func="relu"))
    data = hypernetwork_to_a1111_dict(hn)
    data["activation_func"] = None  # indices now 0 and 1, the file has 0 and 2
    torch.save(data, tmp_path / "m.pt")
    with pytest.raises(UserError) as e:
        load_hypernetwork(tmp_path / "m.pt")
    assert "m.pt" in str(e.value) and "width 8" in str(e.value) and "\n" not in str(e.value)


def test_shorthash_and_optimizer_sidecar(tmp_path):
    hn = Hypernetwork.create("opt", [8], HypernetworkOptions(activation_func="relu")).train()
    optimizer = torch.optim.AdamW(hn.parameters(), lr=1e-3, weight_decay=0.01)
    x = torch.randn(2, 8)
    hn.layers[8][0](x).pow(2).sum().backward()
    optimizer.step()
    path = save_hypernetwork(hn, tmp_path / "opt.pt", optimizer=optimizer)
    raw = torch.load(str(path) + ".optim", weights_only=True)
    full = hashlib.sha256(path.read_bytes()).hexdigest()
    assert raw["hash"] == full[:10] and raw["optimizer_name"] == "AdamW"
    loaded = load_hypernetwork(path)
    assert loaded.shorthash == full[:10]
    side = load_optimizer_sidecar(path)
    assert side.optimizer_name == "AdamW"
    fresh = torch.optim.AdamW(loaded.train().parameters(), lr=1e-3)
    fresh.load_state_dict(side.optimizer_state_dict)
    state = optimizer.state_dict()["state"]
    assert all(torch.equal(fresh.state_dict()["state"][i]["exp_avg"], state[i]["exp_avg"]) for i in state)
    # Rewrite the .pt (another step) without a sidecar: the old sidecar no longer applies.
    hn.step = 1
    save_hypernetwork(hn, path)
    assert load_optimizer_sidecar(path) is None
    assert load_optimizer_sidecar(tmp_path / "absent.pt") is None


# ---------------------------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def unet(tiny_sd1):
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet").eval()
    model.requires_grad_(False)
    return model


def _unet_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor([10, 500]), context


def _run(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def test_context_widths(unet):
    assert attention_context_widths(unet) == {32, 64}


def test_multiplier_zero_and_zero_last_layer_match_stock(unet):
    inputs = _unet_inputs(unet)
    stock = _run(unet, inputs)
    originals = dict(unet.attn_processors)
    hn = _randomise(Hypernetwork.create("h", [32, 64], HypernetworkOptions(activation_func="relu")))
    try:
        assert install_hypernetworks(unet, [(hn, 0.0)]) == 8
        assert all(isinstance(p, HypernetworkAttnProcessor) for p in unet.attn_processors.values())
        assert torch.equal(_run(unet, inputs), stock)
        install_hypernetworks(unet, [(hn, 1.0)])
        changed = _run(unet, inputs)
        assert (changed - stock).abs().max() > 1e-3
        zero = Hypernetwork.create("z", [32, 64], HypernetworkOptions(activation_func="relu"))
        for m in zero.modules():
            nn.init.zeros_(m.linear[-1].weight)
            nn.init.zeros_(m.linear[-1].bias)
        install_hypernetworks(unet, [(zero, 1.0)])
        assert torch.equal(_run(unet, inputs), stock)
        zero.train()  # training mode (multiplier forced to 1) too
        assert torch.equal(_run(unet, inputs), stock)
    finally:
        remove_hypernetworks(unet)
    after = unet.attn_processors
    assert after.keys() == originals.keys() and all(after[k] is originals[k] for k in after)
    assert torch.equal(_run(unet, inputs), stock)


def test_each_width_and_chaining_change_output(unet):
    inputs = _unet_inputs(unet, seed=1)
    stock = _run(unet, inputs)
    opts = HypernetworkOptions(activation_func="relu")
    text_only = _randomise(Hypernetwork.create("t", [32], opts), 1)
    self_only = _randomise(Hypernetwork.create("s", [64], opts), 2)
    elsewhere = _randomise(Hypernetwork.create("e", [768, 320], opts), 3)
    outs = {}
    try:
        for key, stack in {
            "text": [(text_only, 1.0)], "self": [(self_only, 1.0)], "none": [(elsewhere, 1.0)],
            "both": [(text_only, 1.0), (self_only, 1.0)], "reversed": [(self_only, 1.0), (text_only, 1.0)],
            "half": [(text_only, 0.5)],
        }.items():
            install_hypernetworks(unet, stack)
            outs[key] = _run(unet, inputs)
    finally:
        remove_hypernetworks(unet)
    assert torch.equal(outs["none"], stock)  # no module for this model's widths: pass-through
    for key in ("text", "self", "both", "half"):
        assert (outs[key] - stock).abs().max() > 1e-4, key
    assert (outs["both"] - outs["text"]).abs().max() > 1e-4 and (outs["both"] - outs["self"]).abs().max() > 1e-4
    assert torch.allclose(outs["both"], outs["reversed"], atol=1e-5)  # different widths: order does not matter
    assert (outs["half"] - outs["text"]).abs().max() > 1e-5


def test_processor_matches_a1111_formula():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    cross = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    self_attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    hn1 = _randomise(Hypernetwork.create("a", [8, 16], HypernetworkOptions(activation_func="tanh")), 4)
    hn2 = _randomise(Hypernetwork.create("b", [8], HypernetworkOptions(layer_structure=[1, 1.5, 1])), 5)
    x, ctx = torch.randn(2, 6, 16), torch.randn(2, 5, 8)
    stack = [(hn1, 0.8), (hn2, -0.5)]
    for attn in (cross, self_attn):
        attn.set_processor(HypernetworkAttnProcessor(attn.processor, stack))

    def reference(attn, hidden, context):
        ck, cv = apply_hypernetworks(stack, context)
        q, k, v = attn.to_q(hidden), attn.to_k(ck), attn.to_v(cv)
        split = lambda t: t.view(t.shape[0], -1, 2, 8).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return attn.to_out[0](out.transpose(1, 2).reshape(2, -1, 16))

    with torch.no_grad():
        assert torch.allclose(cross(x, ctx), reference(cross, x, ctx), atol=1e-6)
        # self-attention: the context is the hidden states (width 16 has a module in hn1 only)
        assert torch.allclose(self_attn(x), reference(self_attn, x, x), atol=1e-6)
        ck, cv = apply_hypernetworks(stack, ctx)
        m1k, m1v = hn1.layers[8]
        m2k, m2v = hn2.layers[8]
        assert torch.allclose(ck, m2k(m1k(ctx, 0.8), -0.5)) and torch.allclose(cv, m2v(m1v(ctx, 0.8), -0.5))
        assert not torch.allclose(ck, cv)
        sk, _ = apply_hypernetworks(stack, x)
        assert torch.allclose(sk, hn1.layers[16][0](x, 0.8))


def test_low_precision_context_is_cast_back():
    hn = _randomise(Hypernetwork.create("c", [8]))
    ctx = torch.randn(1, 3, 8).to(torch.bfloat16)
    ck, cv = apply_hypernetworks([(hn, 1.0)], ctx)
    assert ck.dtype == torch.bfloat16 and cv.dtype == torch.bfloat16
    expect = hn.layers[8][0](ctx.float(), 1.0).to(torch.bfloat16)
    assert torch.equal(ck, expect)


def test_only_hypernetwork_gets_gradients(unet):
    hn = Hypernetwork.create("g", [32, 64, 768], HypernetworkOptions(activation_func="relu")).train()
    wrapper = HypernetworkTrainingModule(unet, [hn])
    # Only the widths this UNet has are registered (DDP rejects trainable parameters that never get a gradient).
    assert {id(p) for p in wrapper.hypernetwork_modules.parameters()} == {
        id(p) for d in (32, 64) for m in hn.layers[d] for p in m.parameters()}
    inputs = _unet_inputs(unet, seed=2)
    try:
        install_hypernetworks(unet, [(hn, 1.0)])
        out = wrapper(*inputs).sample
        assert torch.equal(out, unet(*inputs).sample)
        out.pow(2).mean().backward()
    finally:
        remove_hypernetworks(unet)
    assert all(p.grad is None for p in unet.parameters())
    for dim in (32, 64):
        for m in hn.layers[dim]:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()), dim
    assert all(p.grad is None for m in hn.layers[768] for p in m.parameters())


# ---------------------------------------------------------------------------------------------------------- prompts


def test_parse_hypernet_tags():
    prompt = "a photo <hypernet:anime_3:0.6> of <lora:x:1> a cat <hypernet:my net>, <hypernet:neg:-1.5>"
    text, found = parse_hypernet_tags(prompt)
    assert text == "a photo  of <lora:x:1> a cat , "
    assert found == [("anime_3", 0.6), ("my net", 1.0), ("neg", -1.5)]
    assert parse_hypernet_tags("plain prompt") == ("plain prompt", [])
    with pytest.raises(UserError, match="bad multiplier"):
        parse_hypernet_tags("<hypernet:x:strong>")


def test_list_hypernetworks(tmp_path):
    for rel in ("a.pt", "sub/deep/b.pt", "None.pt", "sub/c.safetensors", "sub/c.pt.optim", "B2.pt"):
        p = tmp_path / "dir1" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (tmp_path / "dir2").mkdir()
    (tmp_path / "dir2" / "z.pt").write_bytes(b"x")
    found = list_hypernetworks([tmp_path / "dir1", str(tmp_path / "dir2")])
    assert found == {
        "a": tmp_path / "dir1" / "a.pt", "B2": tmp_path / "dir1" / "B2.pt",
        "b": tmp_path / "dir1" / "sub" / "deep" / "b.pt", "z": tmp_path / "dir2" / "z.pt",
    }
    assert list_hypernetworks(tmp_path / "missing") == {}


# ---------------------------------------------------------------------------------------------------------- DDP


def _ddp_batch(rank: int, cross_dim: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300 + rank]), torch.randn(1, 77, cross_dim, generator=g)


def _ddp_new_hypernetwork() -> Hypernetwork:
    torch.manual_seed(0)
    return _randomise(Hypernetwork.create("ddp", [32, 64], HypernetworkOptions(activation_func="relu")), 9).train()


def _ddp_step(model: nn.Module, hn: Hypernetwork, batches) -> None:
    opt = torch.optim.SGD(hn.parameters(), lr=10.0)
    loss = torch.stack([model(*b).sample.pow(2).mean() for b in batches]).mean()
    loss.backward()
    opt.step()


def _ddp_worker(rank: int, world: int, port: int, unet_path: str, out_dir: str) -> None:
    import torch.distributed as dist
    from diffusers import UNet2DConditionModel
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        unet = UNet2DConditionModel.from_pretrained(unet_path, subfolder="unet").requires_grad_(False)
        batch = _ddp_batch(rank, unet.config.cross_attention_dim)
        synced, loose = _ddp_new_hypernetwork(), _ddp_new_hypernetwork()
        install_hypernetworks(unet, [(synced, 1.0)])
        _ddp_step(DistributedDataParallel(HypernetworkTrainingModule(unet, [synced])), synced, [batch])
        install_hypernetworks(unet, [(loose, 1.0)])  # the trap: the hypernetwork outside the DDP-wrapped module
        _ddp_step(unet, loose, [batch])
        weights = {key: [p.detach() for p in hn.parameters()] for key, hn in (("synced", synced), ("loose", loose))}
        torch.save(weights, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_sync_hypernetwork_gradients(tmp_path, tiny_sd1, unet):
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_ddp_worker, args=(2, port, str(tiny_sd1), str(tmp_path)), nprocs=2, join=False,
                             start_method="fork")
    deadline = time.monotonic() + 400  # a hang guard, generous for a loaded machine
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "DDP workers timed out"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert all(torch.equal(a, b) for a, b in zip(r0["synced"], r1["synced"]))
    assert not all(torch.equal(a, b) for a, b in zip(r0["loose"], r1["loose"]))  # the data differ per rank
    # One process, both ranks' samples: same update as DDP's averaged gradients.
    reference = _ddp_new_hypernetwork()
    try:
        install_hypernetworks(unet, [(reference, 1.0)])
        _ddp_step(unet, reference, [_ddp_batch(r, unet.config.cross_attention_dim) for r in range(2)])
    finally:
        remove_hypernetworks(unet)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(r0["synced"], reference.parameters()))
