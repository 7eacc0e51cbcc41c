"""Future-Seed: the pure function (every option), the gates module, and FS through the model's forward."""
from __future__ import annotations

import math

import pytest
import torch

import model.rwkv7 as rwkv7_module
from kernels.reference import wkv7_reference
from model.fs_config import FSConfig, sigmoid
from model.future_seed import FSGates, future_seed
from model.rwkv7 import LayerState

L, H, D, C = 6, 2, 4, 8


def _prev(B=3, seed=0, scale=1.0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, D, D, generator=g) * scale).requires_grad_(requires_grad)


def _gates(fs: FSConfig, n_embd: int = C) -> FSGates:
    return FSGates(fs, L, H, n_embd)


# the pure function -------------------------------------------------------------------------------------------------
def test_scalar_gate():
    fs = FSConfig(alpha_init=-2.0)
    prev = _prev()
    assert torch.allclose(future_seed(prev, 3, L, fs, _gates(fs)), prev * sigmoid(-2.0))


def test_head_gate_multiplies_a_per_head_sigmoid():
    fs = FSConfig(variant="head", alpha_init=-3.0, alpha_head_init=-3.0)
    gates = _gates(fs)
    with torch.no_grad():
        gates.alpha_head[2] = torch.tensor([0.0, 1.0])
    prev = _prev()
    seed = future_seed(prev, 2, L, fs, gates)
    for h, ah in enumerate([0.0, 1.0]):
        assert torch.allclose(seed[:, h], prev[:, h] * sigmoid(-3.0) * sigmoid(ah))
    # the initial head configuration: sigmoid(-3)^2
    assert torch.allclose(future_seed(prev, 3, L, fs, gates), prev * sigmoid(-3.0) ** 2)


def test_input_gate_per_row_and_zero_init_equals_scalar():
    fs = FSConfig(variant="input", alpha_init=-1.0)
    gates = _gates(fs)
    prev = _prev()
    x = torch.randn(3, 5, C, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(future_seed(prev, 4, L, fs, gates, x_in=x), prev * sigmoid(-1.0))
    with torch.no_grad():
        gates.in_w[4] = torch.linspace(-1, 1, C)
        gates.in_b[4] = 0.5
    seed = future_seed(prev, 4, L, fs, gates, x_in=x)
    for b in range(3):
        logit = -1.0 + float(x[b, -1] @ gates.in_w[4]) / math.sqrt(C) + 0.5  # last position only
        assert torch.allclose(seed[b], prev[b] * sigmoid(logit), atol=1e-6)
    assert torch.allclose(future_seed(prev, 4, L, fs, gates, x_in=x[:, -1]), seed)  # [B, C] form
    with pytest.raises(ValueError, match="x_in"):
        future_seed(prev, 4, L, fs, gates)


def test_seed_scale():
    fs = FSConfig(alpha_init=0.0, seed_scale=0.3)
    prev = _prev()
    assert torch.allclose(future_seed(prev, 1, L, fs, _gates(fs)), prev * 0.5 * 0.3)


def test_norm_divides_by_the_rms_per_row_and_head():
    fs = FSConfig(alpha_init=0.0, norm=True)
    prev = _prev(scale=7.0)
    prev[1, 0] = 0.0  # an all-zero (b, h) block: the floor keeps it finite (and zero)
    seed = future_seed(prev, 2, L, fs, _gates(fs))
    rms = (seed / 0.5).pow(2).mean(dim=(-2, -1)).sqrt()
    expected = torch.ones(3, H)
    expected[1, 0] = 0.0
    assert torch.allclose(rms, expected, atol=1e-5)
    assert torch.isfinite(seed).all()


def test_clip_bounds_the_seed_after_norm_and_gate():
    prev = _prev(scale=10.0)
    fs = FSConfig(alpha_init=0.0, norm=True, clip=0.4)
    seed = future_seed(prev, 2, L, fs, _gates(fs))
    normed = prev / prev.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt()
    assert torch.allclose(seed, (normed * 0.5).clamp(-0.4, 0.4))  # normalise, then gate, then clip
    assert not torch.allclose(seed, normed.clamp(-0.4, 0.4) * 0.5)  # (a different order gives other values)
    assert seed.abs().max() <= 0.4 + 1e-7
    unclipped = future_seed(prev, 2, L, FSConfig(alpha_init=0.0, norm=True), _gates(FSConfig(alpha_init=0.0, norm=True)))
    assert unclipped.abs().max() > 0.4


def test_detach_blocks_the_gradient_into_the_previous_state():
    for detach, expect_grad in ((True, False), (False, True)):
        fs = FSConfig(alpha_init=0.0, alpha_lr=1e-3, detach=detach)
        gates = _gates(fs)
        prev = _prev(requires_grad=True)
        future_seed(prev, 2, L, fs, gates).sum().backward()
        assert (prev.grad is not None and prev.grad.abs().max() > 0) == expect_grad
        assert gates.alpha.grad[2] != 0  # the gate still learns


def test_schedule_multiplier_applies():
    fs = FSConfig(alpha_init=0.0, layer_start=2, schedule="linear", schedule_min=0.25, schedule_max=1.0)
    prev = _prev()
    gates = _gates(fs)
    for layer, mult in ((2, 0.25), (5, 1.0)):
        assert torch.allclose(future_seed(prev, layer, L, fs, gates), prev * 0.5 * mult)


def test_unseeded_layers_and_foreign_gates_are_rejected():
    fs = FSConfig(layer_start=3)
    with pytest.raises(ValueError, match="layer 2 receives no seed"):
        future_seed(_prev(), 2, L, fs, _gates(fs))
    with pytest.raises(ValueError, match="layer 0"):
        future_seed(_prev(), 0, L, FSConfig(), _gates(FSConfig()))
    with pytest.raises(ValueError, match="different FS configuration"):
        future_seed(_prev(), 4, L, fs, _gates(FSConfig(layer_start=4)))


# the gates module -----------------------------------------------------------------------------------------------
def test_param_groups_and_frozen_gates():
    frozen = _gates(FSConfig(alpha_lr=0.0))
    assert frozen.param_groups() == [] and not frozen.alpha.requires_grad
    head = _gates(FSConfig(variant="head", alpha_lr=0.0, alpha_head_lr=5e-4))
    groups = head.param_groups()
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [("fs_alpha_head", 5e-4, 0.0)]
    assert groups[0]["params"] == [head.alpha_head] and head.alpha_head.requires_grad and not head.alpha.requires_grad
    inp = _gates(FSConfig(variant="input", alpha_lr=1e-3, in_w_lr=2e-3, in_b_lr=0.0))
    assert {g["name"]: g["lr"] for g in inp.param_groups()} == {"fs_alpha": 1e-3, "fs_in_w": 2e-3}
    assert not inp.in_b.requires_grad
    assert inp.alpha.shape == (L,) and inp.in_w.shape == (L, C) and inp.in_b.shape == (L,)
    assert torch.all(inp.in_w == 0) and torch.all(inp.in_b == 0)
    assert head.alpha_head.shape == (L, H) and torch.all(head.alpha_head == -2.0)


def test_stats_report_the_effective_gates_of_seeded_layers():
    fs = FSConfig(variant="head", alpha_init=-3.0, layer_start=4, schedule="linear", schedule_min=0.5,
                  schedule_max=1.0)
    stats = _gates(fs).stats()
    assert set(stats) == {"gate_l4", "gate_l5", "gate_mean", "alpha_mean"}
    initial = fs.initial_gates(L)
    assert stats["gate_l4"] == pytest.approx(initial[4]) and stats["gate_l5"] == pytest.approx(initial[5])
    assert stats["gate_mean"] == pytest.approx((initial[4] + initial[5]) / 2)
    assert stats["alpha_mean"] == pytest.approx(sigmoid(-3.0))


# FS through the model ------------------------------------------------------------------------------------------
class WkvRecorder:
    """Stands in for the WKV operator: runs the reference and records each call's s0 and sT (one call per layer)."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, r, w, k, v, a, b, s0=None):
        y, sT = wkv7_reference(r, w, k, v, a, b, s0)
        self.calls.append((s0.detach().clone(), sT.detach().clone()))
        return y, sT


@pytest.fixture
def recorder(monkeypatch):
    rec = WkvRecorder()
    monkeypatch.setattr(rwkv7_module, "wkv_operator", lambda kernel: rec)
    return rec


def _fs_model(make_config, make_model, n_layer=4):
    return make_model(make_config(n_layer=n_layer, n_embd=32, head_size=16, d_decay=8, d_aaa=8, d_mv=8, d_gate=8),
                      seed=2)


def _seed_ratio(rec: WkvRecorder, layer: int) -> float:
    """s0 of `layer` / the previous layer's final state (they are proportional when no norm/clip is on)."""
    s0, prev = rec.calls[layer][0], rec.calls[layer - 1][1]
    ratio = (s0 * prev).sum() / (prev * prev).sum()
    assert torch.allclose(s0, prev * ratio, atol=1e-5)
    return ratio.item()


@pytest.mark.parametrize("schedule, lo, start, expected", [
    ("cosine", 0.4, 10, {10: 0.40, 11: 1.00}),
    ("cosine", 0.4, 8, {8: 0.40, 9: 0.55, 10: 0.85, 11: 1.00}),
    ("cosine", 0.4, 6, {6: 0.40, 7: 0.46, 8: 0.61, 9: 0.79, 10: 0.94, 11: 1.00}),
    ("linear", 0.25, 6, {6: 0.25, 7: 0.40, 8: 0.55, 9: 0.70, 10: 0.85, 11: 1.00}),
])
def test_worked_schedule_values_through_the_model(schedule, lo, start, expected, recorder, make_config, make_model,
                                                  make_tokens):
    """The depth schedule's worked values for L=12 (docs/original.md), measured as s0_i / sT_{i-1} in a real
    forward (gate logit 0)."""
    model = _fs_model(make_config, make_model, n_layer=12)
    fs = FSConfig(alpha_init=0.0, layer_start=start, schedule=schedule, schedule_min=lo, schedule_max=1.0)
    with torch.no_grad():
        model(make_tokens(1, 6, 257), fs=fs, fs_gates=model.make_fs_gates(fs))
    for layer in range(12):
        if layer in expected:
            assert _seed_ratio(recorder, layer) / 0.5 == pytest.approx(expected[layer], abs=0.005), f"layer {layer}"
        else:
            assert torch.all(recorder.calls[layer][0] == 0), f"layer {layer} must not be seeded"


def test_layer_start_and_layer_zero(recorder, make_config, make_model, make_tokens):
    model = _fs_model(make_config, make_model, n_layer=5)
    fs = FSConfig(alpha_init=1.0, layer_start=3)
    with torch.no_grad():
        model(make_tokens(2, 7, 257), fs=fs, fs_gates=model.make_fs_gates(fs))
    assert [bool(torch.any(s0 != 0)) for s0, _ in recorder.calls] == [False, False, False, True, True]
    assert _seed_ratio(recorder, 3) == pytest.approx(sigmoid(1.0), abs=1e-5)


def test_fs_seed_adds_to_explicit_seeds(recorder, make_config, make_model, make_tokens):
    model = _fs_model(make_config, make_model, n_layer=3)
    fs = FSConfig(alpha_init=0.0, layer_start=1, norm=True, clip=0.5)
    gates = model.make_fs_gates(fs)
    explicit = model.zero_state(2)
    g = torch.Generator().manual_seed(3)
    for s in explicit:
        s.wkv.copy_(torch.randn(s.wkv.shape, generator=g))
    with torch.no_grad():
        model(make_tokens(2, 5, 257), state=explicit, fs=fs, fs_gates=gates)
    assert torch.equal(recorder.calls[0][0], explicit[0].wkv)  # layer 0: the explicit seed only
    for layer in (1, 2):
        prev_final = recorder.calls[layer - 1][1]
        expected = explicit[layer].wkv + future_seed(prev_final, layer, 3, fs, gates)
        assert torch.allclose(recorder.calls[layer][0], expected, atol=1e-6)


def test_input_gate_reads_the_residual_stream_at_the_last_position(recorder, make_config, make_model, make_tokens,
                                                                   monkeypatch):
    model = _fs_model(make_config, make_model, n_layer=3)
    fs = FSConfig(variant="input", alpha_init=0.0, layer_start=2, alpha_lr=1e-3)
    gates = model.make_fs_gates(fs)
    with torch.no_grad():
        gates.in_w[2] = torch.linspace(-2, 2, 32)
    seen = {}
    original = rwkv7_module.future_seed

    def spy(prev, layer, n_layer, fs_, gates_, x_in=None):
        seen[layer] = x_in.clone()
        return original(prev, layer, n_layer, fs_, gates_, x_in=x_in)

    monkeypatch.setattr(rwkv7_module, "future_seed", spy)
    entering = {}

    def record_input(module, args):
        entering[2] = args[0].detach().clone()

    model.blocks[2].register_forward_pre_hook(record_input)
    idx = make_tokens(2, 6, 257)
    with torch.no_grad():
        model(idx, fs=fs, fs_gates=gates)
    assert torch.equal(seen[2], entering[2][:, -1])
    rows = [_row_ratio(recorder, 2, b) for b in range(2)]
    for b in range(2):
        logit = float(entering[2][b, -1] @ gates.in_w[2].detach()) / math.sqrt(32)
        assert rows[b] == pytest.approx(sigmoid(logit), abs=1e-4)


def _row_ratio(rec, layer, b):
    s0, prev = rec.calls[layer][0][b], rec.calls[layer - 1][1][b]
    return ((s0 * prev).sum() / (prev * prev).sum()).item()


def test_gate_gradients_reach_alpha_through_the_initial_state(make_config, make_model, make_tokens):
    model = _fs_model(make_config, make_model, n_layer=4)
    fs = FSConfig(alpha_init=-1.0, alpha_lr=1e-3, layer_start=2)
    gates = model.make_fs_gates(fs)
    logits, _ = model(make_tokens(2, 8, 257), fs=fs, fs_gates=gates)
    logits.logsumexp(-1).mean().backward()
    assert gates.alpha.grad[2] != 0 and gates.alpha.grad[3] != 0
    assert gates.alpha.grad[0] == 0 and gates.alpha.grad[1] == 0


def test_detach_changes_the_gradient_of_the_previous_layers(make_config, make_model, make_tokens):
    idx = make_tokens(2, 8, 257)
    grads = {}
    for detach in (True, False):
        model = _fs_model(make_config, make_model, n_layer=3)
        fs = FSConfig(alpha_init=0.0, layer_start=2, detach=detach)
        logits, _ = model(idx, fs=fs, fs_gates=model.make_fs_gates(fs))
        logits[:, 0].logsumexp(-1).sum().backward()
        grads[detach] = model.blocks[1].att.key.weight.grad.clone()
    # position 0 depends on block 1's later tokens only through layer 2's seed: without detach that path adds
    # gradient into block 1, with detach it is cut
    assert not torch.allclose(grads[True], grads[False])


def test_fs_changes_the_output_and_off_equals_baseline(make_config, make_model, make_tokens):
    model = _fs_model(make_config, make_model, n_layer=3)
    idx = make_tokens(2, 8, 257)
    fs = FSConfig(alpha_init=0.0, layer_start=1)
    with torch.no_grad():
        base, _ = model(idx)
        on, _ = model(idx, fs=fs, fs_gates=model.make_fs_gates(fs))
        again, _ = model(idx)
    assert (on - base).abs().max() > 1e-3
    assert torch.equal(base, again)


def test_fs_off_never_calls_future_seed(monkeypatch, make_config, make_model, make_tokens):
    model = _fs_model(make_config, make_model, n_layer=3)

    def boom(*args, **kwargs):
        raise AssertionError("future_seed called")

    monkeypatch.setattr(rwkv7_module, "future_seed", boom)
    with torch.no_grad():
        model(make_tokens(1, 4, 257))
        model(make_tokens(1, 4, 257), state=model.zero_state(1), pad_left=torch.tensor([1]))
    fs = FSConfig(layer_start=1)
    with pytest.raises(AssertionError, match="future_seed called"):  # the patch is effective when FS is on
        model(make_tokens(1, 4, 257), fs=fs, fs_gates=model.make_fs_gates(fs))


def test_layer_start_beyond_the_model_is_rejected_once_per_config(monkeypatch, make_config, make_model, make_tokens):
    model = _fs_model(make_config, make_model, n_layer=3)
    bad = FSConfig(layer_start=3)
    with pytest.raises(ValueError, match="layer_start"):
        model(make_tokens(1, 4, 257), fs=bad, fs_gates=FSGates(bad, 3, 2, 32))
    calls = []
    original = FSConfig.check_for_model
    monkeypatch.setattr(FSConfig, "check_for_model", lambda self, n: calls.append(n) or original(self, n))
    fs = FSConfig(layer_start=2)
    gates = model.make_fs_gates(fs)
    with torch.no_grad():
        for _ in range(3):
            model(make_tokens(1, 4, 257), fs=fs, fs_gates=gates)
    assert calls == [3]


def test_fs_needs_matching_gates(make_config, make_model, make_tokens):
    model = _fs_model(make_config, make_model, n_layer=3)
    fs = FSConfig(layer_start=1)
    idx = make_tokens(1, 4, 257)
    with pytest.raises(ValueError, match="fs_gates is None"):
        model(idx, fs=fs)
    with pytest.raises(ValueError, match="without fs"):
        model(idx, fs_gates=model.make_fs_gates(fs))
    with pytest.raises(ValueError, match="different FS configuration"):
        model(idx, fs=fs, fs_gates=model.make_fs_gates(FSConfig(layer_start=2)))
    with pytest.raises(ValueError, match="model shape"):
        model(idx, fs=fs, fs_gates=FSGates(fs, 3, 4, 32))


def test_near_noop_configuration_warns(make_config, make_model, make_tokens):
    model = _fs_model(make_config, make_model, n_layer=3)
    fs = FSConfig(variant="head", alpha_init=-4.0, layer_start=1)
    with pytest.warns(UserWarning, match="close to a no-op"):
        with torch.no_grad():
            model(make_tokens(1, 4, 257), fs=fs, fs_gates=model.make_fs_gates(fs))


def test_fs_with_padding_seeds_from_the_real_tokens_only(make_config, make_model, make_tokens):
    """FS on a left-padded batch gives each row what it gets alone (the seed uses the real tokens' final states)."""
    model = _fs_model(make_config, make_model, n_layer=3)
    fs = FSConfig(variant="input", alpha_init=0.0, layer_start=1, norm=True, clip=1.0)
    gates = model.make_fs_gates(fs)
    with torch.no_grad():
        gates.in_w.normal_(generator=torch.Generator().manual_seed(0))
    row = make_tokens(1, 6, 257, seed=3)
    batch = torch.cat([torch.full((1, 3), 7), row], dim=1)
    with torch.no_grad():
        alone, s_alone = model(row, fs=fs, fs_gates=gates)
        padded, s_pad = model(batch, fs=fs, fs_gates=gates, pad_left=torch.tensor([3]))
    assert (padded[0, 3:] - alone[0]).abs().max() <= 1e-5
    assert all((a.wkv - b.wkv).abs().max() <= 1e-5 for a, b in zip(s_alone, s_pad))
    assert isinstance(s_pad[0], LayerState)
