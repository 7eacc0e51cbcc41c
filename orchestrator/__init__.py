"""fsearch's control plane: specs, planning and decisions, the round loop, records, statistics, reports and the CLI.

No module here imports torch or a torch-side module (worker/, kernels/, the model's torch modules); the training
run is the worker subprocess. tests/test_boundary.py imports every module of this package alone and checks it.
"""
