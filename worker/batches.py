"""Token batches of a task's examples and the forward pass a training step and an evaluation share."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tasks.base import Example
from worker.errors import RunError


class Batch:
    """Token tensors of a list of examples: prompts left-padded (pad_left says how much), answers right-padded."""

    def __init__(self, examples, read_twice: bool, eot_id: int, device, pad_to: tuple[int, int] | None = None):
        """`pad_to` = (prompt, answer) lengths to pad to at least (static shapes for graph replays, fast_step.py)."""
        prompts = [list(e.prompt_ids(read_twice)) for e in examples]
        answers = [list(e.answer_ids) for e in examples]
        if any(len(a) == 0 for a in answers):
            raise RunError("data", "an example has an empty answer")
        P = max(len(p) for p in prompts)
        A = max(len(a) for a in answers)
        if pad_to is not None:
            P, A = max(P, pad_to[0]), max(A, pad_to[1])
        self.n = len(examples)
        self.prompt = _to(torch.tensor([[eot_id] * (P - len(p)) + p for p in prompts], dtype=torch.long), device)
        self.pad_left = _to(torch.tensor([P - len(p) for p in prompts], dtype=torch.long), device)
        ans = _to(torch.tensor([a + [eot_id] * (A - len(a)) for a in answers], dtype=torch.long), device)
        self.answer = ans  # targets
        self.answer_mask = _to(torch.tensor([[1] * len(a) + [0] * (A - len(a)) for a in answers], dtype=torch.bool),
                               device)
        self.answer_in = ans[:, :-1]  # inputs of the answer pass (the first answer token comes from the prompt pass)
        self.n_answer_tokens = sum(len(a) for a in answers)
        self.n_tokens = sum(len(p) for p in prompts) + sum(len(a) for a in answers)


def _to(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`. To a GPU through pinned memory without waiting: a plain copy from pageable memory
    waits for everything queued on the GPU first, so the host could not build the next batch while a step runs."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def forward_answer_logits(model, batch: Batch, fs, gates, fs_on: bool, one_variant: bool = False):
    """Logits [B, A, V] predicting each answer token: position 0 from the prompt pass, the rest from the answer pass
    seeded with the prompt's final states (WKV and token shift).

    `one_variant` (the graph-replayed step) makes both passes look alike to torch.compile, so that a compiled model
    compiles one set of graphs for them instead of two: the answer pass gets a padding of zeros (no position is
    padding) and the prompt pass zero token-shift states that require gradients, as the answer pass's states do. The
    forward numbers are the same either way."""
    state = None
    if one_variant:
        state = model.zero_state(batch.prompt.shape[0], batch.prompt.device)
        for s in state:
            s.att_shift.requires_grad_()
            s.ffn_shift.requires_grad_()
    if fs_on:
        hidden, states = model(batch.prompt, state=state, fs=fs, fs_gates=gates, pad_left=batch.pad_left,
                               return_hidden=True)
    else:
        hidden, states = model(batch.prompt, state=state, pad_left=batch.pad_left, return_hidden=True)
    first = model.logits(hidden[:, -1:])
    if batch.answer_in.shape[1] == 0:
        return first, states
    pad = torch.zeros_like(batch.pad_left) if one_variant else None
    rest_hidden, _ = model(batch.answer_in, state=states, pad_left=pad, return_hidden=True)
    return torch.cat([first, model.logits(rest_hidden)], dim=1), states


def token_losses(logits, batch: Batch):
    V = logits.shape[-1]
    ce = F.cross_entropy(logits.float().reshape(-1, V), batch.answer.reshape(-1), reduction="none")
    return ce.view(batch.n, -1) * batch.answer_mask



def worst_case_batch(mb: int, prompt_len: int, answer_len: int, example: Example, eot_id: int, device,
                     pad_to: tuple[int, int] | None = None) -> Batch:
    """A batch of `mb` synthetic examples with the given lengths (the example's token ids, repeated), padded to
    `pad_to` when given."""
    p = (list(example.prompt_ids(False)) * (prompt_len // max(1, len(example.prompt_ids(False))) + 1))[:prompt_len]
    a = (list(example.answer_ids) * (answer_len // max(1, len(example.answer_ids)) + 1))[:answer_len]
    fake = Example("", "", "", tuple(p), (), tuple(a))
    return Batch([fake] * mb, False, eot_id, device, pad_to)
