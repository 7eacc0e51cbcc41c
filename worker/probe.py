"""The GPU batch probe: the largest micro-batch that fits a task's worst case."""
from __future__ import annotations

import json
import traceback
from pathlib import Path

import torch

from orchestrator.fileio import write_json_atomic
from orchestrator.runconfig import EXIT_CONFIG, EXIT_CRASH, EXIT_DATA, EXIT_OK, EXIT_OOM, RunConfig
from worker.batches import forward_answer_logits, token_losses, worst_case_batch
from worker.errors import RunError
from worker.fast_step import StepInputs, bucketed_lengths, loss_weights
from worker.run import Run, is_oom


def probe(probe_path: Path) -> int:
    """Largest micro-batch that fits: forward + backward + optimizer step at the task's worst-case prompt and answer
    lengths with the run's (heaviest) FS configuration, within `margin` of the device's memory. An OOM moves to the
    next smaller size; any other failure is an error (never a silent "batch 1")."""
    spec = json.loads(Path(probe_path).read_text())
    out_path = Path(probe_path).with_name("probe_result.json")
    cfg = RunConfig(**spec["run"])
    margin = float(spec.get("margin", 0.9))
    if not torch.cuda.is_available():
        write_json_atomic(out_path, {"error_kind": "config", "error_message": "the batch probe needs a CUDA device"})
        return EXIT_CONFIG
    total = torch.cuda.get_device_properties(0).total_memory
    tried = []
    try:
        r = Run(cfg)
        r.setup()
        P, A = r.task.max_lengths()
        for mb in sorted(spec["candidates"], reverse=True):
            r.optimizer.zero_grad(set_to_none=True)
            if r.fast is not None:  # a fresh one per size: the last size's graphs and pool go before measuring
                r.fast = r.build_fast_step()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                fits_one_step(r, mb, P, A)
                torch.cuda.synchronize()
                # with graphs, memory a graph's pool holds but is not using counts too (reserved, not allocated):
                # the next shape's eager step cannot use it
                peak = int(torch.cuda.max_memory_reserved() if r.fast is not None
                           else torch.cuda.max_memory_allocated())
                ok = peak <= margin * total
                tried.append({"micro_batch": mb, "ok": ok, "error_kind": None if ok else "margin",
                              "peak_mem_bytes": peak})
                if ok:
                    write_json_atomic(out_path, {"micro_batch": mb, "peak_mem_bytes": peak, "device_mem_bytes": total,
                                                 "prompt_tokens": P, "answer_tokens": A, "tried": tried,
                                                 "device": torch.cuda.get_device_name(0)})
                    return EXIT_OK
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                tried.append({"micro_batch": mb, "ok": False, "error_kind": "oom", "peak_mem_bytes": None})
        write_json_atomic(out_path, {"error_kind": "oom", "error_message": "no candidate micro-batch fits",
                                     "tried": tried})
        return EXIT_OOM
    except RunError as e:
        write_json_atomic(out_path, {"error_kind": e.kind, "error_message": str(e), "tried": tried})
        return {"config": EXIT_CONFIG, "data": EXIT_DATA}.get(e.kind, EXIT_CRASH)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        write_json_atomic(out_path, {"error_kind": "crash", "error_message": f"{type(e).__name__}: {e}"[:1000],
                                     "tried": tried})
        return EXIT_CRASH


def fits_one_step(r: Run, mb: int, P: int, A: int) -> None:
    """One training step of `mb` worst-case examples as the run would execute it, then the optimizer step. With
    graph replays: the longest bucket's eager step, its capture and a replay, and then one more eager step while that
    graph's memory pool is held, as when a run meets a new (never longer) shape after the longest one; else forward
    and backward."""
    if r.fast is not None:
        b = worst_case_batch(mb, P, A, r.val_set[0], r.tok.eot_id, r.device, bucketed_lengths(P, A))
        inputs = StepInputs.of(b, loss_weights(b, "mean_token", b.n_answer_tokens, mb))
        r.fast.begin()
        r.fast.micro(inputs)  # eager, then captured
        r.fast.micro(inputs)  # replayed
        r.fast.forward_backward(inputs)  # a new shape's first, eager step, beside the graph's pool
    else:
        b = worst_case_batch(mb, P, A, r.val_set[0], r.tok.eot_id, r.device)
        with r.autocast():
            logits, _ = forward_answer_logits(r.model, b, r.fs, r.gates, r.fs is not None)
        token_losses(logits, b).sum().backward()
    r.optimizer.step()

