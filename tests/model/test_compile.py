"""RWKV7 with its blocks' work around the WKV operator compiled (model.compile_backend): the same numbers as the
eager model, graphs reused across batch sizes and lengths, and eager evaluation. On CPU the tests use torch.compile's
"aot_eager" backend (tracing, autograd and graph splitting as in a real compile, no code generation, so no C++
compiler is needed); a GPU test compiles with inductor."""
from __future__ import annotations

import pytest
import torch

from model.fs_config import FSConfig

FS = FSConfig(alpha_init=-1.0, alpha_lr=1e-3, layer_start=1, norm=True, clip=1.0, detach=False)


def _train_pass(model, idx, pad, fs_on: bool):
    """Prompt pass (padding, FS when asked) and an answer pass seeded with its states; a loss over both."""
    gates = model.make_fs_gates(FS) if fs_on else None
    kw = dict(fs=FS, fs_gates=gates) if fs_on else {}
    logits, states = model(idx, pad_left=pad, **kw)
    answer = idx[:, :5].flip(1)
    logits2, _ = model(answer, state=states)
    loss = logits.logsumexp(-1).mean() + logits2.logsumexp(-1).mean() + sum(s.wkv.square().mean() for s in states)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if gates is not None:
        grads.update({f"gates.{n}": p.grad.clone() for n, p in gates.named_parameters() if p.grad is not None})
    return logits.detach(), logits2.detach(), [s.detach() for s in states], grads


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("fs_on", [False, True])
def test_compiled_blocks_give_the_eager_models_outputs_states_and_gradients(fs_on, make_config, make_model,
                                                                             make_tokens):
    cfg = make_config()
    eager = make_model(cfg, seed=3).train()
    compiled = make_model(cfg, seed=3).train()
    compiled.compile_backend = "aot_eager"
    idx = make_tokens(3, 24, cfg.vocab_size, seed=1)
    pad = torch.tensor([0, 4, 11])

    want, got = _train_pass(eager, idx, pad, fs_on), _train_pass(compiled, idx, pad, fs_on)
    for a, b in zip(want[:2], got[:2]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for s, t in zip(want[2], got[2]):
        for x, y in ((s.att_shift, t.att_shift), (s.wkv, t.wkv), (s.ffn_shift, t.ffn_shift)):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    assert want[3].keys() == got[3].keys() and len(want[3]) > 0
    for name in want[3]:
        torch.testing.assert_close(got[3][name], want[3][name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_graphs_are_reused_across_batch_sizes_and_lengths_and_evaluation_stays_eager(make_config, make_model,
                                                                                              make_tokens):
    import torch._dynamo

    cfg = make_config()
    model = make_model(cfg, seed=4).train()
    model.compile_backend = "aot_eager"
    torch._dynamo.reset()
    _train_pass(model, make_tokens(3, 24, cfg.vocab_size), torch.tensor([0, 2, 5]), fs_on=True)
    graphs = _graph_count()
    assert graphs > 0
    _train_pass(model, make_tokens(5, 37, cfg.vocab_size, seed=2), torch.tensor([0, 0, 1, 9, 3]), fs_on=True)
    _train_pass(model, make_tokens(2, 18, cfg.vocab_size, seed=3), torch.tensor([1, 0]), fs_on=False)
    assert _graph_count() == graphs, "a new batch size or length compiled new graphs"

    model.eval()
    with torch.no_grad():
        model(make_tokens(2, 30, cfg.vocab_size))
    model.train()
    with torch.no_grad():
        model(make_tokens(2, 30, cfg.vocab_size))
    model(make_tokens(2, 1, cfg.vocab_size))  # one token: eager
    assert _graph_count() == graphs, "evaluation, no-grad and single-token calls must run eagerly"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inductor_compiled_blocks_match_eager_under_bf16_autocast(make_config, make_model, make_tokens):
    cfg = make_config(n_layer=4, n_embd=128, head_size=64, d_decay=32, d_aaa=32, d_mv=32, d_gate=32)
    eager = make_model(cfg, seed=5, kernel="auto").cuda().train()
    compiled = make_model(cfg, seed=5, kernel="auto").cuda().train()
    compiled.compile_backend = "inductor"
    idx = make_tokens(4, 96, cfg.vocab_size, seed=1).cuda()
    pad = torch.tensor([0, 3, 40, 7], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want, got = _train_pass(eager, idx, pad, True), _train_pass(compiled, idx, pad, True)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()

    assert rel(got[0], want[0]) < 2e-2 and rel(got[1], want[1]) < 2e-2
    assert max(rel(t.wkv, s.wkv) for s, t in zip(want[2], got[2])) < 2e-2
    for name in want[3]:
        if want[3][name].norm() > 0:
            assert rel(got[3][name], want[3][name]) < 5e-2, name


def test_one_set_of_graphs_serves_every_layer(make_config, make_model, make_tokens):
    """Graphs are per segment and variant (layer 0 or not, padded or not), not per layer: a deeper model compiles
    nothing more (an integer attribute such as layer_id read inside a compiled function would make one graph per
    layer, and past torch.compile's recompile limit the rest would silently run eagerly)."""
    import torch._dynamo

    counts = []
    for n_layer in (2, 5):
        cfg = make_config(n_layer=n_layer)
        model = make_model(cfg, seed=1).train()
        model.compile_backend = "aot_eager"
        torch._dynamo.reset()
        before = _graph_count()  # the counter outlives the reset
        _train_pass(model, make_tokens(2, 20, cfg.vocab_size), torch.tensor([0, 3]), fs_on=True)
        counts.append(_graph_count() - before)
    assert counts[0] == counts[1] > 0
