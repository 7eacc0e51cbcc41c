"""The worker: one run, train FS-RWKV-7 on a task for a budget of optimizer steps and measure it. The only place where torch,
the model and the data meet; the scheduler spawns it as a subprocess:

    python -m worker RUN.json            # RUN.json is an orchestrator.runconfig.RunConfig
    python -m worker --probe PROBE.json  # GPU batch probe (worker/probe.py)
    python -m worker --serve             # runs named on stdin, one after another (worker/serve.py; defaults.worker)

What a run is (every choice here exists to make a run a reproducible measurement):
- Budget in optimizer steps, never wall-clock time. Evaluations at step 0, every `eval_every` steps and at the end.
- Fixed validation and test sets from the task's data seed; the training seed only orders the training stream and
  seeds torch. On CPU the same config gives the same result.
- Prompt pass (Future-Seed on, in mode prompt_fs), then the answer pass seeded with the prompt's final WKV and
  token-shift states. `read_twice` shows the context twice, FS off. `baseline` never touches FS code.
- Loss: mean cross-entropy over all answer tokens of the effective batch (token-weighted, independent of how the
  batch is split into micro-batches), or the original's loss0 + mean(rest) for comparison.
- AdamW on fp32 master weights with parameter groups; bf16 autocast only on CUDA; gradient clipping; accumulation.
- Metrics of one evaluation always come together: `best` is the whole eval with the best primary metric.
- A non-finite loss ends the run with status `diverged`: a result, not a crash.
"""
