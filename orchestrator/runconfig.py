"""The contract between the scheduler and the worker: one run's input (RunConfig) and output (RunResult).

Torch-free. The worker reads `run.json` (a RunConfig), writes into `run_dir`:
  config.json   the RunConfig as resolved (plus environment facts),
  metrics.jsonl one line per evaluation,
  result.json   a RunResult, written atomically (temp file + rename) as the last act of the run.

Worker exit codes (the scheduler trusts result.json first and falls back on the code when it is missing):
  0   the run produced a result: status "ok" or "diverged" (non-finite loss is a result, not a crash)
  1   crash (an unexpected exception; result.json carries the traceback's last line when it could be written)
  10  oom       (device out of memory)
  11  data      (the task's data could not be built)
  12  config    (the run configuration is invalid; raised before any training)
Any other code or a signal (killed, time limit) is classified by the scheduler as `crash` or `timeout`.
"""
from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from model.config import ModelConfig, preset, with_shape
from model.fs_config import FSConfig

ErrorKind = Literal["oom", "diverged", "data", "config", "crash", "timeout"]
Status = Literal["ok", "diverged", "failed"]
# test hooks (see worker/run.py): "oom" fails while micro_batch == batch_size (a halved retry passes),
# "oom_always", "crash" (every attempt), "crash_once" (attempt 0 only), "hang" (never returns), "diverge" (loss
# becomes non-finite), "data" (the data build fails)
Fault = Literal["oom", "oom_always", "crash", "crash_once", "hang", "diverge", "data"]
# How a training step runs (spec defaults.compile): "off" eager; "on" the blocks' work around the WKV kernel
# torch.compile'd; "graphs" compiled blocks, lengths padded to buckets (static shapes), and each micro-batch's forward,
# loss and backward replayed as a CUDA graph (worker/fast_step.py); "eager-graphs" the same replays of the eager
# blocks (no torch.compile: starts in seconds, steps slower than "graphs"); "auto" = "graphs" on CUDA, "off" elsewhere.
CompileMode = Literal["auto", "off", "on", "graphs", "eager-graphs"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
GRAPH_MODES = ("graphs", "eager-graphs")  # steps replayed as CUDA graphs (CUDA only)
COMPILED_MODES = ("on", "graphs")  # steps whose blocks are torch.compile'd


def compile_mode(value: Any) -> Any:
    """A compile setting as a mode name: YAML's on/off and JSON's true/false (how it was written before it had
    more than two values) read as "on"/"off"."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


def resolve_compile(mode: str, device_type: str) -> str:
    """The step a run with compile setting `mode` executes on a device of this type ("cuda" or "cpu")."""
    if mode == "auto":
        return "graphs" if device_type == "cuda" else "off"
    return mode

EXIT_OK = 0
EXIT_CRASH = 1
# the batch probe's request file; a warm worker told to run a file of this name runs the probe on it (worker/serve.py)
PROBE_FILE = "PROBE.json"
EXIT_OOM = 10
EXIT_DATA = 11
EXIT_CONFIG = 12
EXIT_KIND = {EXIT_OOM: "oom", EXIT_DATA: "data", EXIT_CONFIG: "config", EXIT_CRASH: "crash"}


class ModelShape(BaseModel):
    """Shape overrides applied on top of a from-scratch preset (model.config.with_shape): only the fields given
    change; what the preset derives from its shape (ffn_dim, LoRA ranks) is derived again unless given here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_layer: int | None = Field(None, ge=1)
    n_embd: int | None = Field(None, ge=1)
    head_size: int | None = Field(None, ge=1)  # must divide n_embd (the preset's, when n_embd is not given)
    ffn_dim: int | None = Field(None, ge=1)
    d_decay: int | None = Field(None, ge=1)  # LoRA ranks
    d_aaa: int | None = Field(None, ge=1)
    d_mv: int | None = Field(None, ge=1)
    d_gate: int | None = Field(None, ge=1)

    @model_serializer(mode="wrap")
    def _given_only(self, handler: Any) -> dict[str, Any]:
        # the fields given, nothing else: {n_layer: 2} and {n_layer: 2, n_embd: null} are one shape (one run key)
        return {k: v for k, v in handler(self).items() if v is not None}

    def overrides(self) -> dict[str, int]:
        return {k: v for k, v in self if v is not None}


class ModelSource(BaseModel):
    """Where the weights come from: a from-scratch preset (optionally reshaped) or a checkpoint (BlinkDL .pth, HF
    folder, fsearch .pt)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str | None = None
    checkpoint: str | None = None
    # from-scratch initialisation seed, identical for a candidate and its baseline. Absent: the run's seed, so that
    # seeds differ in their initialisation as well as their data order; a number fixes one initialisation for every
    # seed. A checkpoint's weights are its own (init does not apply).
    init_seed: int | None = None
    shape: ModelShape | None = None  # from-scratch only: overrides of the preset's shape (part of the run key)

    @model_validator(mode="before")
    @classmethod
    def _empty_shape_is_none(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("shape"), dict) and \
                not any(v is not None for v in data["shape"].values()):
            data = {**data, "shape": None}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSource":
        if (self.preset is None) == (self.checkpoint is None):
            raise ValueError("model: give exactly one of `preset` or `checkpoint`")
        if self.shape is not None and self.checkpoint is not None:
            raise ValueError("model.shape: only a from-scratch `preset` takes shape overrides; a checkpoint's shape is "
                             "its own")
        return self

    @model_serializer(mode="wrap")
    def _without_absent_shape(self, handler: Any) -> dict[str, Any]:
        # run keys hash this dump. No `shape` key unless one is given: keys of specs without overrides stay what they
        # were before shapes existed. A fixed init seed dumps as it always did (init_seed: N); a checkpoint dumps the
        # old default 0 (its keys hold); a preset whose init follows the run seed has no `init_seed` key, a new key
        # for a different run.
        data = handler(self)
        if self.shape is None:
            data.pop("shape", None)
        if self.init_seed is None:
            if self.checkpoint is not None:
                data["init_seed"] = 0
            else:
                data.pop("init_seed", None)
        return data

    def init_seed_for(self, run_seed: int) -> int | None:
        """The seed that initialises a from-scratch model in a run of seed `run_seed` (None for a checkpoint)."""
        if self.preset is None:
            return None
        return run_seed if self.init_seed is None else self.init_seed

    def seed_controls(self) -> list[str]:
        """What a run's seed varies: the data order always, the initialisation when it follows the seed."""
        return ["data_order", "init"] if self.preset is not None and self.init_seed is None else ["data_order"]

    def build_config(self) -> ModelConfig:
        """The ModelConfig a from-scratch run builds: the preset with the shape overrides applied. ValueError (one
        line) for an unknown preset or a shape that does not fit; for a checkpoint source, which has no config here."""
        if self.preset is None:
            raise ValueError("model: a checkpoint's configuration is read from the checkpoint")
        return with_shape(preset(self.preset), self.shape.overrides() if self.shape is not None else None)


class LearningRates(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: float = 1e-3
    weight_decay: float = 0.01  # on matrices only; never on norms, biases, mixes or gates
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    warmup_steps: int = 0


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_key: str
    round: str = "adhoc"
    task: str  # the spec's task label (e.g. sudoku4_refine)
    task_kind: str  # the registry name (e.g. sudoku)
    task_params: dict[str, Any] = Field(default_factory=dict)
    candidate: str
    mode: Literal["baseline", "prompt_fs", "read_twice"]
    fs: FSConfig | None = None
    model: ModelSource
    stage: str = "adhoc"
    steps: int  # optimizer steps: the budget
    eval_every: int
    n_val: int = 64
    n_test: int = 64
    data_seed: int = 0  # fixes validation and test sets, independent of `seed`
    seed: int = 0  # training seed: batch order, any dropout/noise, and a from-scratch init unless model.init_seed
    batch_size: int  # effective batch (examples per optimizer step)
    micro_batch: int | None = None  # examples per forward; default = batch_size
    lr: LearningRates = Field(default_factory=LearningRates)
    loss: Literal["mean_token", "first_plus_rest"] = "mean_token"
    kernel: str = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: CompileMode = "off"  # how the training step runs (CompileMode; spec defaults.compile)
    cpu_threads: int = 1  # torch threads on CPU: fixed, because results depend on it (and 1 is fastest at demo size)
    sandbox: Literal["enforced", "unsafe"] = "enforced"  # how model-written code is executed (Defaults.sandbox)
    eval_batch: int = 64
    run_dir: str
    attempt: int = 0
    fault: Fault | None = None  # test hook: inject a failure (see worker/run.py)

    @field_validator("compile", mode="before")
    @classmethod
    def _compile(cls, v: Any) -> Any:
        return compile_mode(v)

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        mb = self.micro_batch or self.batch_size
        if mb < 1 or self.batch_size % mb:
            raise ValueError(f"micro_batch ({mb}) must divide batch_size ({self.batch_size})")
        if (self.mode == "prompt_fs") != (self.fs is not None):
            raise ValueError(f"mode {self.mode!r} {'needs' if self.mode == 'prompt_fs' else 'takes no'} fs configuration")
        return self

    @property
    def init_seed(self) -> int | None:
        """The from-scratch initialisation seed of this run (None for a checkpoint)."""
        return self.model.init_seed_for(self.seed)

    @property
    def seed_controls(self) -> list[str]:
        return self.model.seed_controls()

    @property
    def grad_accum(self) -> int:
        return self.batch_size // (self.micro_batch or self.batch_size)


class RunResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: Status
    error_kind: ErrorKind | None = None
    error_message: str | None = None
    steps: int = 0  # optimizer steps completed
    final: dict[str, float] = Field(default_factory=dict)  # metrics of the last evaluation (at `steps`)
    best: dict[str, float] = Field(default_factory=dict)  # every metric of the ONE eval with the best primary metric
    best_step: int | None = None
    test: dict[str, float] = Field(default_factory=dict)  # held-out test metrics of the final model
    primary_metric: str | None = None
    wall_s: float = 0.0
    train_tokens: int = 0
    tokens_per_s: float = 0.0
    peak_mem_bytes: int | None = None
    # seconds from the worker process's start to the end of its first optimizer step: imports, model, data, the
    # step-0 evaluation, compiling and capturing (what a run pays before it trains at speed)
    first_step_s: float | None = None
    micro_batch: int | None = None
    grad_accum: int | None = None
    device: str | None = None
    compiled: bool | None = None  # whether the training forwards ran torch.compile'd blocks
    step_mode: str | None = None  # the step as executed: a CompileMode other than "auto"
    sandbox: str | None = None  # the executor mode model-written code ran under ("enforced" or "unsafe")
