"""The graph-replayed training step (worker/fast_step.py).

On CPU: the length buckets, the loss weights, and FastStep's eager path (the function a graph records) against the
worker's eager step: same loss and gradients, micro-batches accumulating like one batch, bucket padding changing
nothing but rounding. On a GPU (marked gpu): graph replays equal eager FastStep bit for bit, across shapes that share
one memory pool, and stay within bf16 tolerance of the eager worker step; a worker run with graphs repeats itself and
equals the same run without graph replays exactly."""
from __future__ import annotations

import json
import random

import pytest
import torch

from model.fs_config import FSConfig
from model.future_seed import FSGates
from tasks.base import Example
from tests.model.conftest import noisy_model, small_config
from worker.batches import Batch, forward_answer_logits, token_losses
from worker.fast_step import FastStep, StepInputs, bucket_length, bucketed_lengths, loss_weights

FS = FSConfig(alpha_init=-1.0, alpha_lr=1e-3, layer_start=1, norm=True, clip=1.0, detach=False)


def test_buckets_waste_at_most_a_quarter_and_are_their_own_bucket():
    assert [bucket_length(n) for n in (1, 7, 16, 17, 20, 21, 33, 64, 65, 127, 128, 129, 2048, 2049, 4096)] == \
        [1, 7, 16, 20, 20, 24, 40, 64, 80, 128, 128, 160, 2048, 2560, 4096]
    previous = 0
    for n in range(1, 5000):
        b = bucket_length(n)
        assert n <= b <= 1.25 * n and bucket_length(b) == b and b >= previous
        previous = b
    assert bucketed_lengths(100, 5) == (112, 5)
    with pytest.raises(ValueError):
        bucket_length(0)


def _examples(n: int, seed: int, vocab: int, prompt=(5, 14), answer=(1, 6)) -> list[Example]:
    rng = random.Random(seed)
    return [Example("", "", "", tuple(rng.randrange(1, vocab) for _ in range(rng.randint(*prompt))), (),
                    tuple(rng.randrange(1, vocab) for _ in range(rng.randint(*answer)))) for _ in range(n)]


@pytest.mark.parametrize("loss", ["mean_token", "first_plus_rest"])
def test_weighted_token_loss_is_the_workers_loss(loss):
    cfg = small_config()
    model = noisy_model(cfg, seed=2).train()
    exs = _examples(4, 0, cfg.vocab_size)
    b = Batch(exs, False, 0, "cpu")
    with torch.no_grad():
        tl = token_losses(forward_answer_logits(model, b, None, None, False)[0], b)
    n = b.n_answer_tokens
    want = tl.sum() / n if loss == "mean_token" else tl[:, 0].sum() / 4 + tl[:, 1:].sum() / (n - 4)
    w = loss_weights(b, loss, n, 4)
    assert w.dtype == torch.float32 and bool((w[~b.answer_mask] == 0).all())
    torch.testing.assert_close((tl * w).sum(), want, rtol=1e-6, atol=0)


def _eager_step(model, gates, batches, total):
    """The worker's eager step (worker/run.py): per micro-batch, token loss / answer tokens of the step, backward."""
    params = list(model.parameters()) + (list(gates.parameters()) if gates is not None else [])
    for p in params:
        p.grad = None
    for b in batches:
        logits, _ = forward_answer_logits(model, b, FS if gates else None, gates, gates is not None)
        (token_losses(logits, b).sum() / total).backward()
    return {id(p): p.grad.clone() for p in params if p.grad is not None}


def _fast_step(model, gates, batches, total):
    params = list(model.parameters()) + (list(gates.parameters()) if gates is not None else [])
    fast = FastStep(model, params, FS if gates else None, gates, autocast_dtype=None, graphs=False)
    fast.begin()
    loss = sum(fast.micro(StepInputs.of(b, loss_weights(b, "mean_token", total, 8))) for b in batches)
    return loss, {id(p): p.grad.clone() for p in params if p.grad is not None}


@pytest.mark.parametrize("fs_on", [False, True])
def test_fast_step_gives_the_eager_steps_gradients_and_micro_batches_accumulate(fs_on):
    cfg = small_config()
    model = noisy_model(cfg, seed=1).train()
    gates = FSGates(FS, cfg.n_layer, cfg.n_head, cfg.n_embd) if fs_on else None
    exs = _examples(8, 3, cfg.vocab_size)
    whole = [Batch(exs, False, 0, "cpu")]
    halves = [Batch(exs[:4], False, 0, "cpu"), Batch(exs[4:], False, 0, "cpu")]
    total = whole[0].n_answer_tokens
    want = _eager_step(model, gates, whole, total)
    _, got_whole = _fast_step(model, gates, whole, total)
    _, got_halves = _fast_step(model, gates, halves, total)
    assert want.keys() == got_whole.keys() == got_halves.keys() and len(want) > 10
    for k in want:
        torch.testing.assert_close(got_whole[k], want[k], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got_halves[k], want[k], rtol=1e-4, atol=1e-7)


def test_padding_to_buckets_changes_nothing_but_rounding():
    cfg = small_config()
    model = noisy_model(cfg, seed=4).train()
    gates = FSGates(FS, cfg.n_layer, cfg.n_head, cfg.n_embd)
    exs = _examples(8, 5, cfg.vocab_size, prompt=(18, 23), answer=(3, 7))
    plain = Batch(exs, False, 0, "cpu")
    padded = Batch(exs, False, 0, "cpu", pad_to=(40, 12))
    assert padded.prompt.shape[1] == 40 and padded.answer.shape[1] == 12 and padded.n_tokens == plain.n_tokens
    loss_a, grads_a = _fast_step(model, gates, [plain], plain.n_answer_tokens)
    loss_b, grads_b = _fast_step(model, gates, [padded], padded.n_answer_tokens)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0)
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-3, atol=1e-6)


def test_a_step_starts_with_begin_and_keeps_its_gradient_buffers():
    cfg = small_config()
    model = noisy_model(cfg, seed=0).train()
    fast = FastStep(model, list(model.parameters()), autocast_dtype=None, graphs=False)
    b = Batch(_examples(2, 0, cfg.vocab_size), False, 0, "cpu")
    inputs = StepInputs.of(b, loss_weights(b, "mean_token", b.n_answer_tokens, 2))
    with pytest.raises(RuntimeError, match="begin"):
        fast.micro(inputs)
    fast.begin()
    buffers = [p.grad for p in model.parameters()]
    fast.micro(inputs)
    first = [g.clone() for g in buffers]
    fast.begin()  # a new step: zeros, in the same buffers
    assert all(p.grad is g for p, g in zip(model.parameters(), buffers)) and all(not g.any() for g in buffers)
    fast.micro(inputs)
    assert all(torch.equal(a, g) for a, g in zip(first, buffers))
    model.emb.weight.grad = None  # e.g. a zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="begin"):
        fast.micro(inputs)


class _ReplayOnCPU:
    """Stands in for a CUDA graph on CPU: recording runs nothing (the gradients are left as they were), a replay
    runs forward_backward on the graph's static inputs and writes the loss where the graph's output lives."""

    def __init__(self, fast, static):
        self.fast, self.static = fast, static
        self.loss = torch.zeros(())

    def replay(self):
        self.loss.copy_(self.fast.forward_backward(self.static))


def test_graph_bookkeeping_eager_first_then_replays_with_each_batch_copied_in_least_recently_used_dropped(monkeypatch):
    """What FastStep does around the CUDA calls, on CPU: a new shape's micro-batch runs eagerly and is recorded; later
    ones of that shape are copied into the graph's inputs and replayed (their own loss and gradients, not the recorded
    batch's); past max_graphs the least recently used graph goes."""
    cfg = small_config()
    model = noisy_model(cfg, seed=6).train()
    params = list(model.parameters())
    fast = FastStep(model, params, autocast_dtype=None, graphs=True, max_graphs=2)
    eager = FastStep(model, params, autocast_dtype=None, graphs=False)
    monkeypatch.setattr(fast, "_run_on_side_stream", fast.forward_backward)
    recorded = []

    def record(static):
        graph = _ReplayOnCPU(fast, static)
        recorded.append(static.shape_key)
        return graph, graph.loss

    monkeypatch.setattr(fast, "_record", record)
    shapes = [(20, 5), (20, 5), (24, 6), (20, 5), (28, 7), (24, 6), (24, 6)]
    for i, pad_to in enumerate(shapes):
        b = Batch(_examples(3, 100 + i, cfg.vocab_size, prompt=(10, pad_to[0]), answer=(2, pad_to[1])), False, 0,
                  "cpu", pad_to)
        inputs = StepInputs.of(b, loss_weights(b, "mean_token", b.n_answer_tokens, 3))
        results = []
        for f in (fast, eager):
            f.begin()
            results.append((f.micro(inputs), [p.grad.clone() for p in params]))
        (loss_a, grads_a), (loss_b, grads_b) = results
        assert torch.equal(loss_a, loss_b), i
        assert all(torch.equal(x, y) for x, y in zip(grads_a, grads_b)), i
    # (20, 5) recorded; (24, 6) recorded; (28, 7) evicts (24, 6), the least recently used; (24, 6) is recorded again
    assert recorded == [(3, 20, 5), (3, 24, 6), (3, 28, 7), (3, 24, 6)]
    assert fast.captures == 4 and fast.replays == 3 and list(fast.graphs) == [(3, 28, 7), (3, 24, 6)]


# GPU -------------------------------------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_model(seed=5):
    cfg = small_config(n_layer=4, n_embd=128, head_size=64, d_decay=32, d_aaa=32, d_mv=32, d_gate=32)
    model = noisy_model(cfg, seed=seed, kernel="auto").cuda().train()
    model.compile_backend = "inductor"
    return cfg, model


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fs_on", [False, True])
def test_graph_replays_equal_eager_fast_steps_bit_for_bit(fs_on):
    cfg, model = _gpu_model()
    gates = FSGates(FS, cfg.n_layer, cfg.n_head, cfg.n_embd).cuda() if fs_on else None
    params = list(model.parameters()) + (list(gates.parameters()) if gates is not None else [])
    fs = FS if fs_on else None
    graphed = FastStep(model, params, fs, gates)
    eager = FastStep(model, params, fs, gates, graphs=False)
    # two shapes, met in the order A A B A B: captures, replays, and replays after another graph used the shared pool
    shapes = [((40, 12), 0), ((40, 12), 1), ((80, 20), 2), ((40, 12), 3), ((80, 20), 4)]
    for (pad_to, seed) in shapes:
        exs = _examples(6, seed, cfg.vocab_size, prompt=(20, pad_to[0]), answer=(3, pad_to[1]))
        halves = [Batch(exs[:3], False, 0, "cuda", pad_to), Batch(exs[3:], False, 0, "cuda", pad_to)]
        total = sum(b.n_answer_tokens for b in halves)
        results = []
        for fast in (graphed, eager):
            fast.begin()
            loss = sum(fast.micro(StepInputs.of(b, loss_weights(b, "mean_token", total, 6))) for b in halves)
            results.append((loss.clone(), [p.grad.clone() for p in params]))
        (la, ga), (lb, gb) = results
        assert torch.equal(la, lb), (pad_to, seed)
        assert all(torch.equal(x, y) for x, y in zip(ga, gb)), (pad_to, seed)
    assert graphed.captures == 2 and graphed.replays == 2 * 5 - 2


@pytest.mark.gpu
@needs_gpu
def test_graph_replays_stay_within_bf16_tolerance_of_the_eager_worker_step():
    cfg, model = _gpu_model()
    eager_model = noisy_model(cfg, seed=5, kernel="auto").cuda().train()
    gates = FSGates(FS, cfg.n_layer, cfg.n_head, cfg.n_embd).cuda()
    exs = _examples(8, 7, cfg.vocab_size, prompt=(30, 60), answer=(4, 16))
    b = Batch(exs, False, 0, "cuda")
    total = b.n_answer_tokens
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = _eager_step(eager_model, gates, [b], total)
    want = [want[id(p)] for p in eager_model.parameters()]
    fast = FastStep(model, list(model.parameters()) + list(gates.parameters()), FS, gates)
    padded = Batch(exs, False, 0, "cuda", bucketed_lengths(b.prompt.shape[1], b.answer.shape[1]))
    for _ in range(2):  # eager + capture, then a replay
        fast.begin()
        fast.micro(StepInputs.of(padded, loss_weights(padded, "mean_token", total, 8)))
    for (name, p), w in zip(model.named_parameters(), want):
        if w.norm() > 0:
            rel = ((p.grad - w).norm() / w.norm()).item()
            assert rel < 5e-2, (name, rel)


@pytest.mark.gpu
@needs_gpu
def test_a_worker_run_with_graphs_repeats_itself_and_equals_the_run_without_replays(tmp_path, monkeypatch):
    from orchestrator.runconfig import ModelSource
    from tests.worker.test_run import make_config as run_config, result_of, strip_timing
    from worker import run as worker_run

    results = []
    for name, graphs in (("a", True), ("b", True), ("c", False)):
        monkeypatch.setattr(worker_run, "FastStep",
                            lambda *a, _g=graphs, **kw: FastStep(*a, **kw, graphs=_g))
        path = run_config(tmp_path, name, candidate="scalar_l2_trainable", device="cuda", compile="graphs",
                          model=ModelSource(preset="small"))
        assert worker_run.run(path) == 0, (tmp_path / name / "result.json").read_text()
        res = result_of(tmp_path, name)
        assert res["status"] == "ok" and res["step_mode"] == "graphs"
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        results.append((strip_timing(res), [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]))
    assert results[0] == results[1] == results[2]



def test_graphs_on_a_cpu_run_are_a_config_error_and_auto_runs_eagerly_there(tmp_path):
    from tests.worker.test_run import make_config as run_config, result_of
    from worker.run import run as run_worker

    for mode in ("graphs", "eager-graphs"):
        assert run_worker(run_config(tmp_path, mode, device="cpu", compile=mode, steps=2, eval_every=2)) == 12
        assert "CUDA" in result_of(tmp_path, mode)["error_message"]
    assert run_worker(run_config(tmp_path, "a", device="cpu", steps=2, eval_every=2)) == 0
    res = result_of(tmp_path, "a")
    assert res["step_mode"] == "off" and res["compiled"] is False


@pytest.mark.gpu
@needs_gpu
def test_the_probe_bounds_what_a_graph_replayed_run_then_uses(tmp_path):
    """The batch probe (graph-replayed step) picks a micro-batch whose measured peak covers the run's own peak."""
    from orchestrator.runconfig import ModelSource
    from tests.worker.test_run import make_config as run_config, result_of
    from worker.probe import probe
    from worker.run import run as run_worker

    path = run_config(tmp_path, "p", candidate="scalar_l2_trainable", device="cuda", model=ModelSource(preset="small"),
                      steps=3, eval_every=3, compile="graphs")
    spec = tmp_path / "probe.json"
    spec.write_text(json.dumps({"run": json.loads(path.read_text()), "candidates": [32, 16, 8], "margin": 0.9}))
    assert probe(spec) == 0
    chosen = json.loads((tmp_path / "probe_result.json").read_text())
    assert chosen["micro_batch"] == 32
    import gc

    gc.collect()  # the probe's model and graphs go; the run's peak is its own
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run = run_config(tmp_path, "r", candidate="scalar_l2_trainable", device="cuda", model=ModelSource(preset="small"),
                     steps=3, eval_every=3, batch_size=32, compile="graphs")
    assert run_worker(run) == 0
    res = result_of(tmp_path, "r")
    assert res["step_mode"] == "graphs" and res["peak_mem_bytes"] <= chosen["peak_mem_bytes"]


def test_the_fast_step_compiles_one_variant_for_both_passes():
    """FastStep's prompt and answer passes go through one set of compiled graphs (the block-0 variant and the
    others' of the attention segment, one of the other segment), half of what a worker compiled at start-up; the
    forward numbers do not change."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    cfg = small_config()
    counts = []
    for one_variant in (False, True):
        model = noisy_model(cfg, seed=1).train()
        model.compile_backend = "aot_eager"
        torch._dynamo.reset()
        before = int(counters["stats"]["unique_graphs"])
        b = Batch(_examples(3, 0, cfg.vocab_size, answer=(3, 6)), False, 0, "cpu")
        logits, _ = forward_answer_logits(model, b, None, None, False, one_variant=one_variant)
        logits.sum().backward()
        counts.append(int(counters["stats"]["unique_graphs"]) - before)
        if one_variant:
            with torch.no_grad():
                plain, _ = forward_answer_logits(model, b, None, None, False)
            torch.testing.assert_close(logits.detach(), plain, rtol=0, atol=0)
    assert counts == [6, 3]
