"""RWKV7 behaviour: state continuation, left padding, hidden/logits split, mixed precision, gradients, init."""
from __future__ import annotations

import math

import pytest
import torch

from model.init import from_scratch, init_weights
from model.rwkv7 import GROUP_NORM_EPS, LayerState, RWKV7

CONTINUATION_TOL = 1e-5


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def _states_diff(s1: list[LayerState], s2: list[LayerState]) -> float:
    return max(max(_max_diff(a.att_shift, b.att_shift), _max_diff(a.wkv, b.wkv), _max_diff(a.ffn_shift, b.ffn_shift))
               for a, b in zip(s1, s2))


def _random_state(model: RWKV7, B: int, seed: int) -> list[LayerState]:
    g = torch.Generator().manual_seed(seed)
    return [LayerState(torch.randn(s.att_shift.shape, generator=g), torch.randn(s.wkv.shape, generator=g) * 0.5,
                       torch.randn(s.ffn_shift.shape, generator=g)) for s in model.zero_state(B)]


def test_prompt_then_answer_equals_contiguous(make_config, make_model, make_tokens):
    model = make_model(make_config(), seed=1)
    idx = make_tokens(2, 40, 257, seed=2)
    with torch.no_grad():
        full, full_state = model(idx)
        prompt_logits, prompt_state = model(idx[:, :25])
        answer_logits, answer_state = model(idx[:, 25:], state=prompt_state)
    assert _max_diff(torch.cat([prompt_logits, answer_logits], dim=1), full) <= CONTINUATION_TOL
    assert _states_diff(answer_state, full_state) <= CONTINUATION_TOL
    # the token-shift states matter: dropping them (zero shifts, WKV kept) changes the answer's logits
    wkv_only = [LayerState(torch.zeros_like(s.att_shift), s.wkv, torch.zeros_like(s.ffn_shift)) for s in prompt_state]
    with torch.no_grad():
        wrong, _ = model(idx[:, 25:], state=wkv_only)
    assert _max_diff(wrong, answer_logits) > 1e-3


def test_single_token_steps_equal_sequence(make_config, make_model, make_tokens):
    model = make_model(make_config(n_layer=2), seed=3)
    idx = make_tokens(1, 12, 257, seed=4)
    with torch.no_grad():
        full, full_state = model(idx)
        state, steps = None, []
        for t in range(idx.shape[1]):
            logits, state = model(idx[:, t:t + 1], state=state)
            steps.append(logits)
    assert _max_diff(torch.cat(steps, dim=1), full) <= CONTINUATION_TOL
    assert _states_diff(state, full_state) <= CONTINUATION_TOL


@pytest.mark.parametrize("with_state", [False, True])
def test_left_padding_changes_nothing(with_state, make_config, make_model, make_tokens):
    """A left-padded row gives the unpadded row's logits at its real positions and the same final states."""
    model = make_model(make_config(), seed=5)
    T, pads = 20, [0, 3, 7, 19]
    rows = [make_tokens(1, T - p, 257, seed=10 + i) for i, p in enumerate(pads)]
    batch = torch.stack([torch.cat([torch.full((p,), 5), r[0]]) for p, r in zip(pads, rows)])
    start = _random_state(model, len(pads), seed=6) if with_state else None
    with torch.no_grad():
        logits, state = model(batch, state=start, pad_left=torch.tensor(pads))
        for b, (p, row) in enumerate(zip(pads, rows)):
            own_start = [LayerState(s.att_shift[b:b + 1], s.wkv[b:b + 1], s.ffn_shift[b:b + 1])
                         for s in start] if start else None
            ref_logits, ref_state = model(row, state=own_start)
            assert _max_diff(logits[b, p:], ref_logits[0]) <= CONTINUATION_TOL, f"row {b} (pad {p})"
            row_state = [LayerState(s.att_shift[b:b + 1], s.wkv[b:b + 1], s.ffn_shift[b:b + 1]) for s in state]
            assert _states_diff(row_state, ref_state) <= CONTINUATION_TOL, f"row {b} (pad {p})"


def test_left_padding_is_needed(make_config, make_model, make_tokens):
    """Without pad_left the pad tokens do change the real positions (so the test above is not vacuous)."""
    model = make_model(make_config(), seed=5)
    row = make_tokens(1, 10, 257, seed=1)
    padded = torch.cat([torch.full((1, 4), 5), row], dim=1)
    with torch.no_grad():
        ref, _ = model(row)
        unmasked, _ = model(padded)
    assert _max_diff(unmasked[0, 4:], ref[0]) > 1e-3


def test_fully_padded_row_keeps_its_state(make_config, make_model):
    model = make_model(make_config(n_layer=2), seed=7)
    start = _random_state(model, 1, seed=8)
    with torch.no_grad():
        _, state = model(torch.full((1, 6), 9), state=start, pad_left=torch.tensor([6]))
    assert _states_diff(state, start) == 0.0


@pytest.mark.parametrize("bad", [[-1, 0], [0, 9], [[0, 1]]])
def test_pad_left_validation(bad, make_config, make_model):
    model = make_model(make_config(n_layer=1), seed=0)
    with pytest.raises(ValueError, match="pad_left"):
        model(torch.zeros(2, 8, dtype=torch.long), pad_left=torch.tensor(bad))


def test_state_must_have_one_entry_per_layer(make_config, make_model):
    model = make_model(make_config(), seed=0)
    with pytest.raises(ValueError, match="state has 2 layers"):
        model(torch.zeros(1, 4, dtype=torch.long), state=model.zero_state(1)[:2])


def test_hidden_then_logits_equals_logits(make_config, make_model, make_tokens):
    model = make_model(make_config(), seed=2)
    idx = make_tokens(2, 9, 257)
    with torch.no_grad():
        logits, _ = model(idx)
        hidden, _ = model(idx, return_hidden=True)
    assert hidden.shape == (2, 9, 64)
    assert logits.dtype == torch.float32 and logits.shape == (2, 9, 257)
    assert torch.equal(model.logits(hidden), logits)
    assert _max_diff(model.logits(hidden[:, -1:]), logits[:, -1:]) <= 1e-6  # BLAS blocking may differ in the last bit


def test_bf16_autocast_keeps_fp32_weights_states_and_logits(make_config, make_model, make_tokens):
    model = make_model(make_config(), seed=3)
    idx = make_tokens(2, 16, 257)
    with torch.no_grad():
        ref, _ = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, state = model(idx)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert logits.dtype == torch.float32
    assert all(s.wkv.dtype == torch.float32 and s.att_shift.dtype == torch.float32 for s in state)
    rel = (logits - ref).norm() / ref.norm()
    assert rel < 0.05, f"bf16 logits deviate by {rel:.3g} (relative)"


def test_every_parameter_and_the_initial_state_get_gradients(make_config, make_model, make_tokens):
    model = make_model(make_config(), seed=4)
    idx = make_tokens(2, 12, 257)
    start = _random_state(model, 2, seed=1)
    for s in start:
        s.wkv.requires_grad_(True)
        s.att_shift.requires_grad_(True)
    logits, state = model(idx, state=start)
    (logits.logsumexp(-1).mean() + sum(s.wkv.square().mean() for s in state)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    assert all(s.wkv.grad.abs().max() > 0 and s.att_shift.grad.abs().max() > 0 for s in start)


def test_parameter_names_are_blinkdl_keys(make_config):
    cfg = make_config(n_layer=2)
    keys = RWKV7(cfg).state_dict().keys()
    C = cfg.n_embd
    att = ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1", "a2", "g1", "g2", "k_k", "k_a",
           "r_k", "receptance.weight", "key.weight", "value.weight", "output.weight", "ln_x.weight", "ln_x.bias"]
    expected = {"emb.weight", "ln_out.weight", "ln_out.bias", "head.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias"}
    for i in range(2):
        expected |= {f"blocks.{i}.{n}.{p}" for n in ("ln1", "ln2") for p in ("weight", "bias")}
        expected |= {f"blocks.{i}.att.{n}" for n in att + (["v0", "v1", "v2"] if i > 0 else [])}
        expected |= {f"blocks.{i}.ffn.x_k", f"blocks.{i}.ffn.key.weight", f"blocks.{i}.ffn.value.weight"}
    assert set(keys) == expected
    sd = RWKV7(cfg).state_dict()
    assert sd["blocks.1.att.w0"].shape == (1, 1, C) and sd["blocks.1.att.w1"].shape == (C, cfg.d_decay)
    assert sd["blocks.1.att.w2"].shape == (cfg.d_decay, C) and sd["blocks.0.att.r_k"].shape == (cfg.n_head, 16)
    assert sd["blocks.0.ffn.key.weight"].shape == (cfg.ffn_dim, C)
    assert RWKV7(cfg).blocks[0].att.ln_x.eps == GROUP_NORM_EPS == 64e-5


def test_init_is_deterministic_and_follows_the_rwkv7_scheme(make_config):
    cfg = make_config(n_layer=4)
    a, b, c = (init_weights(RWKV7(cfg), seed) for seed in (11, 11, 12))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["head.weight"], sc["head.weight"])
    C, N, L = cfg.n_embd, cfg.head_size, cfg.n_layer
    att = a.blocks[1].att
    # decay bias at channel n of layer 1: -6 + 6 (n/(C-1))^(1 + (1/3)^0.3) + 0.5 + 2.5 zigzag
    n = 37
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    w0 = -6 + 6 * (n / (C - 1)) ** (1 + (1 / 3) ** 0.3) + 0.5 + 2.5 * z * abs(z)
    assert att.w0[0, 0, n].item() == pytest.approx(w0, abs=1e-5)
    assert att.x_r[0, 0, n].item() == pytest.approx(1 - (n / C) ** (0.2 * (1 - 1 / L)), abs=1e-6)
    assert a.blocks[3].ffn.x_k[0, 0, n].item() == pytest.approx(1 - (n / C) ** ((1 - 3 / L) ** 4), abs=1e-6)
    assert torch.all(att.output.weight == 0) and torch.all(a.blocks[2].ffn.value.weight == 0)
    assert torch.all(att.w1 == 0) and torch.all(att.v1 == 0) and torch.all(att.g1 == 0)
    assert torch.allclose(att.k_a, torch.full_like(att.k_a, 1.02)) and torch.allclose(att.r_k, torch.full_like(att.r_k, -0.04))
    assert att.ln_x.weight[0].item() == pytest.approx((2 / L) ** 0.7)
    assert a.emb.weight.abs().max() <= 1e-4
    # orthogonal with the documented gains: rows of W/gain are orthonormal (square) / columns (tall)
    k = att.key.weight / 0.1
    assert torch.allclose(k @ k.T, torch.eye(C), atol=1e-4)
    head = a.head.weight / (0.5 * math.sqrt(cfg.vocab_size / C))
    assert torch.allclose(head.T @ head, torch.eye(C), atol=1e-4)


def test_init_sets_every_parameter_so_from_scratch_equals_the_constructed_model(make_config, monkeypatch):
    """from_scratch skips the constructor's default init and reuses the weights of a (shape, seed) met before: it
    must give exactly init_weights(RWKV7(cfg), seed), and init_weights must leave no parameter unset."""
    import model.init as init

    cfg = make_config(n_layer=3)
    poisoned = RWKV7(cfg)
    for p in poisoned.parameters():
        p.data.fill_(float("nan"))
    assert not any(p.isnan().any() for p in init_weights(poisoned, 5).parameters())

    monkeypatch.setattr(init, "_INITIAL", type(init._INITIAL)())
    drawn = []
    real = init.init_weights
    monkeypatch.setattr(init, "init_weights", lambda m, s: (drawn.append(s), real(m, s))[1])
    expected = {s: init_weights(RWKV7(cfg), s).state_dict() for s in (5, 6)}
    for seed in (5, 6, 5, 5, 6):
        model = from_scratch(cfg, seed)
        got = model.state_dict()
        assert got.keys() == expected[seed].keys() and all(torch.equal(got[k], expected[seed][k]) for k in got)
        assert all(p.device.type == "cpu" and p.requires_grad for p in model.parameters())
    assert drawn == [5, 6]  # later models of a seed copy the kept weights
    model.head.weight.data.zero_()  # a run changes its own model, never the kept weights
    assert torch.equal(from_scratch(cfg, 6).head.weight, expected[6]["head.weight"])
    monkeypatch.setattr(init, "INITIAL_CACHE_BYTES", 1)  # too large to keep: drawn again each time
    from_scratch(cfg, 7), from_scratch(cfg, 7)
    assert drawn == [5, 6, 7, 7]


def test_from_scratch_model_runs_and_predicts_near_uniform(make_config, make_tokens):
    model = init_weights(RWKV7(make_config(), kernel="reference"), seed=0)
    with torch.no_grad():
        logits, _ = model(make_tokens(2, 16, 257))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 257), make_tokens(2, 16, 257, seed=1).reshape(-1))
    assert torch.isfinite(logits).all()
    assert abs(loss.item() - math.log(257)) < 1.5


def test_default_kernel_matches_the_oracle_with_padding_fs_and_gradients(make_config, make_model, make_tokens):
    """kernel "auto" (kernels.dispatch: the chunked torch path on CPU) against the per-step reference, through the
    whole model: logits, final states, every parameter's gradient and the FS gate's gradient."""
    from model.fs_config import FSConfig

    cfg = make_config()
    idx = make_tokens(3, 37, 257, seed=3)
    pad = torch.tensor([0, 4, 11])
    fs = FSConfig(alpha_init=-1.0, alpha_lr=1e-3, layer_start=1, norm=True, clip=1.0)
    runs = {}
    for kernel in ("reference", "auto"):
        model = make_model(cfg, seed=6, kernel=kernel)
        gates = model.make_fs_gates(fs)
        start = _random_state(model, 3, seed=9)
        logits, state = model(idx, state=start, fs=fs, fs_gates=gates, pad_left=pad)
        (logits.logsumexp(-1).mean() + sum(s.wkv.square().mean() for s in state)).backward()
        runs[kernel] = (logits.detach(), [s.detach() for s in state], dict(model.named_parameters()), gates)
    (ref_logits, ref_state, ref_params, ref_gates), (logits, state, params, gates) = runs["reference"], runs["auto"]
    assert _max_diff(logits, ref_logits) <= 1e-4
    assert _states_diff(state, ref_state) <= 1e-4
    for name, p in params.items():
        scale = ref_params[name].grad.abs().max().item()
        assert _max_diff(p.grad, ref_params[name].grad) <= 1e-4 * max(1.0, scale), name
    assert _max_diff(gates.alpha.grad, ref_gates.alpha.grad) <= 1e-4
