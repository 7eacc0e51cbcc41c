"""One training run (see the package docstring): `Run` sets up model, task, FS gates and optimizer, trains for the
budget and evaluates; `run(config_path)` is the entry point that turns every outcome into a result.json."""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch

from model.checkpoint import load_any
from model.future_seed import FSGates
from model.init import from_scratch
from model.optim import AdamW  # torch.optim.AdamW's update without torch.optim's start-up imports
from model.tokenizers import get_tokenizer
from orchestrator.decisions import lower_is_better
from orchestrator.fileio import finite_json, write_json_atomic
from orchestrator.runconfig import (COMPILED_MODES, EXIT_CONFIG, EXIT_CRASH, EXIT_DATA, EXIT_OK, EXIT_OOM, GRAPH_MODES,
                                    RunConfig, RunResult, resolve_compile)
from tasks import DataUnavailable, TaskError, get_task
from worker.batches import Batch, forward_answer_logits, token_losses
from worker.errors import RunError
from worker.fast_step import FastStep, StepInputs, bucketed_lengths, loss_weights

PROGRESS_EVERY_S = 1.0
# A graph-replayed step's loss stays on the GPU until the run evaluates, writes its progress, or has this many
# unread: the host builds the next batches while the GPU works instead of waiting for each step's loss.
MAX_PENDING_LOSSES = 64


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


class Run:
    def __init__(self, cfg: RunConfig, started_at: float | None = None):
        self.cfg = cfg
        self.dir = Path(cfg.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.t_start = started_at if started_at is not None else self.t0  # the worker process's start
        self.first_step_s: float | None = None
        self.steps_done = 0
        self.train_tokens = 0
        self.evals: list[dict[str, float]] = []
        self._last_progress = 0.0
        # (step, loss, tokens after it) of steps whose loss is not read back yet (Run.settle)
        self.pending: list[tuple[int, float | torch.Tensor, int]] = []

    # setup ----------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise RunError("config", "device 'cuda' requested but CUDA is not available")
        self.device = torch.device("cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and
                                                                       torch.cuda.is_available())) else "cpu")
        precision = cfg.precision if cfg.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        if precision == "bf16" and self.device.type != "cuda":
            raise RunError("config", "precision bf16 (autocast) is supported on CUDA only; use fp32 on CPU")
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
        self.precision = precision
        reset_peak_memory(self.device.type)  # this run's own peak, also in a worker that ran others before it
        if self.step_mode in GRAPH_MODES and self.device.type != "cuda":
            raise RunError("config", f"compile '{self.step_mode}' replays CUDA graphs: it needs a CUDA device "
                                     "(use auto or off)")
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.cpu_threads)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        # CPU kernels are deterministic for a fixed thread count (the determinism test checks it); not calling
        # torch.use_deterministic_algorithms also spares the worker's start-up the import of torch._inductor

        self.model = self.build_model()
        self.tok = self.build_tokenizer()
        self.task = self.build_task()
        self.fs = cfg.fs if cfg.mode == "prompt_fs" else None
        self.gates = None
        if self.fs is not None:
            try:
                warnings = self.fs.check_for_model(self.model.cfg.n_layer)
            except ValueError as e:
                raise RunError("config", str(e)) from None
            for w in warnings:
                print(f"warning: {w}", file=sys.stderr)
            c = self.model.cfg
            self.gates = FSGates(self.fs, c.n_layer, c.n_head, c.n_embd).to(self.device)
        self.optimizer = self.build_optimizer()
        self.fast = self.build_fast_step() if self.step_mode in GRAPH_MODES else None

    @property
    def step_mode(self) -> str:
        """How this run's training step executes on its device: "off", "on", "graphs" or "eager-graphs"
        (runconfig.CompileMode, "auto" resolved)."""
        return resolve_compile(self.cfg.compile, self.device.type)

    def trained_params(self) -> list:
        """The tensors the optimizer updates (model and trainable FS gates)."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def build_fast_step(self) -> FastStep:
        """The graph-replayed step (worker/fast_step.py) over the optimizer's parameters."""
        return FastStep(self.model, self.trained_params(), self.fs, self.gates,
                        autocast_dtype=torch.bfloat16 if self.precision == "bf16" else None)

    def build_model(self):
        src = self.cfg.model
        try:
            if src.preset is not None:
                # the preset with the spec's shape; init seed = the run's seed unless the spec fixes it
                model = from_scratch(src.build_config(), self.cfg.init_seed, kernel=self.cfg.kernel)
            else:
                model = load_any(src.checkpoint, kernel=self.cfg.kernel)
        except (ValueError, FileNotFoundError) as e:
            raise RunError("config", f"model: {str(e).splitlines()[0]}") from None
        torch.manual_seed(self.cfg.seed)  # the init seed must not make the training seed's streams depend on it
        model.compile_backend = "inductor" if self.step_mode in COMPILED_MODES else None
        return model.to(self.device).float()

    def build_tokenizer(self):
        tok = get_tokenizer(self.model.cfg.tokenizer)
        if tok.vocab_size > self.model.cfg.vocab_size:
            raise RunError("config", f"tokenizer {tok.name} has {tok.vocab_size} ids but the model's vocabulary is "
                                     f"{self.model.cfg.vocab_size}")
        return tok

    def build_task(self):
        cfg = self.cfg
        try:
            task = get_task(cfg.task_kind, cfg.task_params, self.tok, cfg.data_seed)
            if hasattr(task, "sandbox_mode"):  # the task runs model-written code: in the spec's sandbox mode
                task.sandbox_mode = cfg.sandbox
        except DataUnavailable as e:
            raise RunError("data", str(e)) from None
        except TaskError as e:
            raise RunError("config", str(e)) from None
        try:
            if cfg.fault == "data":
                raise RunError("data", "injected data fault (test hook)")
            self.val_set = task.eval_set("val", cfg.n_val)
            self.test_set = task.eval_set("test", cfg.n_test)
            self.train_stream = task.train_examples(cfg.seed)
        except RunError:
            raise
        except (DataUnavailable, TaskError) as e:
            raise RunError("data", str(e)) from None
        except Exception as e:  # a builder that breaks is a data error of this task, with its message
            raise RunError("data", f"{type(e).__name__}: {e}") from None
        return task

    def build_optimizer(self):
        lr = self.cfg.lr
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            # weight decay on matrices (linears, embedding, head); never on norms, biases, mixes or LoRA biases
            (decay if p.ndim >= 2 and name.endswith(".weight") else no_decay).append(p)
        groups = [{"params": decay, "lr": lr.model, "weight_decay": lr.weight_decay, "name": "model_decay"},
                  {"params": no_decay, "lr": lr.model, "weight_decay": 0.0, "name": "model_no_decay"}]
        if self.gates is not None:
            groups += [g for g in self.gates.param_groups() if g["lr"] > 0]
        for g in groups:
            g["base_lr"] = g["lr"]
        # the graph-replayed step (a new setup anyway) takes the fused update: the same AdamW, rounded differently
        return AdamW(groups, betas=lr.betas, eps=1e-8, fused=self.step_mode in GRAPH_MODES)

    # training -------------------------------------------------------------------------------------------------------
    def next_examples(self, n: int) -> list:
        try:
            return [next(self.train_stream) for _ in range(n)]
        except StopIteration:
            raise RunError("data", "the task's training stream ended") from None

    def train_step(self, step: int) -> "float | torch.Tensor":
        """One optimizer step; its loss: a float (eager step), or a 0-dim tensor on the device still being computed
        (graph-replayed step: `settle` reads it later, so that the host prepares the next batch meanwhile)."""
        cfg = self.cfg
        if cfg.fault == "hang":
            while True:
                time.sleep(3600)
        if cfg.fault == "crash" or (cfg.fault == "crash_once" and cfg.attempt == 0):
            raise RuntimeError("injected crash (test hook)")
        if cfg.fault == "oom_always" or (cfg.fault == "oom" and (cfg.micro_batch or cfg.batch_size) == cfg.batch_size):
            raise torch.OutOfMemoryError("injected out-of-memory (test hook)")
        examples = self.next_examples(cfg.batch_size)
        mb = cfg.micro_batch or cfg.batch_size
        read_twice = cfg.mode == "read_twice"
        pad_to = None
        if self.fast is not None:  # static shapes: every micro-batch of the step padded to the step's length bucket
            pad_to = bucketed_lengths(max(len(e.prompt_ids(read_twice)) for e in examples),
                                      max(len(e.answer_ids) for e in examples))
        micro = [Batch(examples[i:i + mb], read_twice, self.tok.eot_id, self.device, pad_to)
                 for i in range(0, len(examples), mb)]
        total_answer_tokens = sum(b.n_answer_tokens for b in micro)
        for g in self.optimizer.param_groups:
            warm = cfg.lr.warmup_steps
            g["lr"] = g["base_lr"] * (min(1.0, step / warm) if warm > 0 else 1.0)
        if self.fast is not None:
            loss_total = self.fast_forward_backward(micro, total_answer_tokens)
        else:
            loss_total = self.eager_forward_backward(micro, total_answer_tokens)
        if cfg.fault == "diverge" and step >= 2:
            loss_total = loss_total * float("nan")  # a float, or a tensor on the device like a real divergence
        if isinstance(loss_total, float) and not math.isfinite(loss_total):
            return loss_total  # (a tensor's is known at `settle`; the run ends there and its weights are not used)
        if cfg.lr.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trained_params(), cfg.lr.grad_clip)
        self.optimizer.step()
        return loss_total

    def fast_forward_backward(self, micro: list[Batch], total_answer_tokens: int) -> torch.Tensor:
        """The step's gradients by FastStep (graph replays); the step's loss, on the device (not read back)."""
        self.fast.begin()
        loss = None
        for b in micro:
            weight = loss_weights(b, self.cfg.loss, total_answer_tokens, self.cfg.batch_size)
            part = self.fast.micro(StepInputs.of(b, weight))
            loss = part if loss is None else loss + part
            self.train_tokens += b.n_tokens
        return loss

    def eager_forward_backward(self, micro: list[Batch], total_answer_tokens: int) -> float:
        """The step's gradients, one forward and backward per micro-batch; the step's loss."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        for b in micro:
            with self.autocast():
                logits, _ = forward_answer_logits(self.model, b, self.fs, self.gates, self.fs is not None)
            tl = token_losses(logits, b)
            if cfg.loss == "mean_token":
                loss = tl.sum() / total_answer_tokens
            else:  # the original's loss0 + mean(rest), per effective batch
                n_rest = total_answer_tokens - cfg.batch_size
                loss = tl[:, 0].sum() / cfg.batch_size + (tl[:, 1:].sum() / n_rest if n_rest > 0 else 0.0)
            loss.backward()
            loss_total += float(loss.detach())
            self.train_tokens += b.n_tokens
        return loss_total

    # evaluation -----------------------------------------------------------------------------------------------------
    def evaluate(self, examples: list, prefix: str) -> dict[str, float]:
        """Teacher-forced loss / token accuracy / exact match, plus the task's unit metrics on greedy decodes."""
        self.model.eval()
        loss_sum, tok_correct, n_tok, exact, units = 0.0, 0, 0, 0, {}
        with torch.no_grad(), self.autocast():
            for i in range(0, len(examples), self.cfg.eval_batch):
                chunk = examples[i:i + self.cfg.eval_batch]
                b = Batch(chunk, self.cfg.mode == "read_twice", self.tok.eot_id, self.device)
                logits, states = forward_answer_logits(self.model, b, self.fs, self.gates, self.fs is not None)
                tl = token_losses(logits, b)
                loss_sum += float(tl.sum())
                pred = logits.argmax(-1)
                correct = (pred == b.answer) & b.answer_mask
                tok_correct += int(correct.sum())
                n_tok += b.n_answer_tokens
                exact += int(((correct | ~b.answer_mask).all(dim=1)).sum())
                if self.task.unit_metrics:
                    decoded = self.greedy_decode(b, logits[:, 0], states)
                    for ex, ids in zip(chunk, decoded):
                        for k, v in self.task.score(ex, self.tok.decode(ids)).items():
                            units[k] = units.get(k, 0.0) + float(v)
        self.model.train()
        out = {f"{prefix}_loss": loss_sum / max(1, n_tok), f"{prefix}_tok_acc": tok_correct / max(1, n_tok),
               f"{prefix}_exact": exact / max(1, len(examples))}
        out.update({f"{prefix}_{k}": v / max(1, len(examples)) for k, v in units.items()})
        return out

    def greedy_decode(self, b: Batch, first_logits, states) -> list[list[int]]:
        """Generate each example's answer length greedily from the prompt's final states (no teacher forcing)."""
        lengths = b.answer_mask.sum(1).tolist()
        tok = first_logits.argmax(-1)
        out = [tok]
        for _ in range(max(lengths) - 1):
            h, states = self.model(tok[:, None], state=states, return_hidden=True)
            tok = self.model.logits(h[:, -1]).argmax(-1)
            out.append(tok)
        ids = torch.stack(out, dim=1).tolist()
        return [row[:n] for row, n in zip(ids, lengths)]

    def log_eval(self, step: int, train_loss: float | None) -> dict[str, float]:
        metrics = self.evaluate(self.val_set, "val")
        row: dict[str, Any] = {"step": step, "tokens": self.train_tokens, "wall_s": round(time.time() - self.t0, 3),
                               "train_loss": None if train_loss is None else _finite_or_none(train_loss)}
        row.update(metrics)
        if self.gates is not None:
            row.update(self.gates.stats())
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(finite_json(row), allow_nan=False) + "\n")
        self.evals.append(row)
        return row

    def settle(self) -> tuple[float, bool]:
        """Read back the losses of the steps since the last call (one transfer for those left on the device): the
        last step's loss and False, or, at the first non-finite loss, that loss and True, with the run's count of
        steps and tokens put back to what they were at that step (the steps after it ran, but do not count)."""
        on_device = [x for _, x, _ in self.pending if isinstance(x, torch.Tensor)]
        values = iter(torch.stack(on_device).tolist() if on_device else ())
        loss = float("nan")
        for step, x, tokens in self.pending:
            loss = next(values) if isinstance(x, torch.Tensor) else x
            if not math.isfinite(loss):
                self.steps_done, self.train_tokens = step - 1, tokens
                self.pending.clear()
                return loss, True
        self.pending.clear()
        return loss, False

    def progress(self, step: int, loss: float) -> None:
        now = time.time()
        self._last_progress = now
        elapsed = now - self.t_train
        rate = step / elapsed if elapsed > 0 and step else 0.0
        write_json_atomic(self.dir / "progress.json", {
            "step": step, "steps": self.cfg.steps, "loss": _finite_or_none(loss),
            "tokens_per_s": self.train_tokens / elapsed if elapsed > 0 else 0.0,
            "eta_s": (self.cfg.steps - step) / rate if rate else None, "updated": now})

    def train(self) -> RunResult:
        cfg = self.cfg
        primary = "val_" + self.task.primary_metric
        self.t_train = time.time()
        self.log_eval(0, None)
        t_eval0 = time.time()
        status, loss = "ok", float("nan")
        for step in range(1, cfg.steps + 1):
            self.pending.append((step, self.train_step(step), self.train_tokens))
            self.steps_done = step
            evaluate = step % cfg.eval_every == 0 or step == cfg.steps
            report = time.time() - self._last_progress >= PROGRESS_EVERY_S
            if step == 1 or evaluate or report or len(self.pending) >= MAX_PENDING_LOSSES or \
                    not isinstance(self.pending[-1][1], torch.Tensor):
                loss, diverged = self.settle()
                if diverged:
                    status = "diverged"
                    break
            if step == 1:  # the loss was read back: the step's GPU work is done
                now = time.time()
                self.first_step_s = now - self.t_start
                print(f"start-up: {self.t0 - self.t_start:.2f} s before the run (process start, imports), setup "
                      f"{self.t_train - self.t0:.2f} s, step-0 evaluation {t_eval0 - self.t_train:.2f} s, first "
                      f"step {now - t_eval0:.2f} s ({self.step_mode})", file=sys.stderr, flush=True)
            if report:
                self.progress(step, loss)
            if evaluate:
                self.log_eval(step, loss)
        train_wall = time.time() - self.t_train
        self.progress(self.steps_done, loss)
        result = RunResult(status=status, steps=self.steps_done, primary_metric=self.task.primary_metric,
                           sandbox=cfg.sandbox if hasattr(self.task, "sandbox_mode") else None,
                           micro_batch=cfg.micro_batch or cfg.batch_size, grad_accum=cfg.grad_accum,
                           device=self.device_name(), compiled=self.step_mode in COMPILED_MODES,
                           step_mode=self.step_mode, train_tokens=self.train_tokens, first_step_s=self.first_step_s,
                           tokens_per_s=self.train_tokens / train_wall if train_wall > 0 else 0.0)
        if status == "diverged":
            result.error_kind = "diverged"
            result.error_message = f"non-finite training loss at step {self.steps_done + 1}"
        else:
            final = self.evals[-1]
            scored = [e for e in self.evals if e.get(primary) is not None]
            sign = 1 if lower_is_better(primary) else -1
            best = min(scored, key=lambda e: (sign * e[primary], e["step"])) if scored else final
            result.final = {k: v for k, v in final.items() if k.startswith("val_")}
            result.best = {k: v for k, v in best.items() if k.startswith("val_")}
            result.best_step = best["step"]
            result.test = self.evaluate(self.test_set, "test")
        return result

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"


def reset_peak_memory(device_type: str) -> None:
    """Start this run's peak memory: the CUDA allocator's peak, or on the CPU the process's peak resident size (Linux
    resets it on "5" written to /proc/self/clear_refs), so that a run in a warm worker reports its own peak."""
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_bytes(device_type: str) -> int | None:
    """The run's peak: the CUDA allocator's since reset_peak_memory, or the process's peak resident size (VmHWM)."""
    if device_type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # process peak RSS on Linux
    except Exception:
        return None


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run(config_path: Path, started_at: float | None = None) -> int:
    """One run from its config file; `started_at`: when the worker process started (time.time()), which its
    first_step_s counts from (default: now)."""
    try:
        raw = json.loads(Path(config_path).read_text())
    except (OSError, ValueError) as e:
        print(f"error: cannot read run config {config_path}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    run_dir = Path(raw.get("run_dir") or Path(config_path).parent)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def finish(result: RunResult, code: int) -> int:
        result.wall_s = time.time() - t0
        write_json_atomic(run_dir / "result.json", result.model_dump(mode="json"))
        return code

    try:
        cfg = RunConfig(**raw)
    except Exception as e:
        msg = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in getattr(e, "errors", lambda: [])())
        return finish(RunResult(status="failed", error_kind="config", error_message=msg or str(e)), EXIT_CONFIG)
    r = Run(cfg, started_at)
    write_json_atomic(run_dir / "config.json", {**cfg.model_dump(mode="json"), "python": sys.version.split()[0],
                                                "pid": os.getpid()})
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    device_type = "cpu"
    try:
        r.setup()
        device_type = r.device.type
        result = r.train()
        result.peak_mem_bytes = peak_memory_bytes(device_type)
        return finish(result, EXIT_OK)
    except RunError as e:
        code = {"config": EXIT_CONFIG, "data": EXIT_DATA, "oom": EXIT_OOM}.get(e.kind, EXIT_CRASH)
        return finish(RunResult(status="failed", error_kind=e.kind, error_message=str(e), steps=r.steps_done), code)
    except BaseException as e:  # noqa: BLE001 - classify, record, keep the traceback on stderr
        if isinstance(e, KeyboardInterrupt):
            raise
        if is_oom(e):
            return finish(RunResult(status="failed", error_kind="oom", error_message=str(e).splitlines()[0][:500],
                                    steps=r.steps_done, peak_mem_bytes=peak_memory_bytes(device_type),
                                    micro_batch=cfg.micro_batch or cfg.batch_size), EXIT_OOM)
        traceback.print_exc()
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        return finish(RunResult(status="failed", error_kind="crash", error_message=last[:1000], steps=r.steps_done),
                      EXIT_CRASH)
