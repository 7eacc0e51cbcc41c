import pytest
import torch

from model.optim import AdamW


@pytest.mark.parametrize("mode", ["per-tensor", "foreach", "fused"])
@pytest.mark.parametrize("torch_foreach", [False, True], ids=["torch-single", "torch-foreach"])
def test_matches_torch_adamw_over_several_steps(mode, torch_foreach):
    torch.manual_seed(0)
    shapes = [(5, 3), (7,), (2, 2, 2), (4, 4)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    groups = lambda ps: [{"params": ps[:1], "lr": 1e-2, "weight_decay": 0.1},  # noqa: E731
                         {"params": ps[1:], "lr": 3e-3, "weight_decay": 0.05}]
    a = AdamW(groups(ours), betas=(0.9, 0.99), eps=1e-8, foreach=mode == "foreach",
              fused=mode == "fused")
    b = torch.optim.AdamW(groups(ref), betas=(0.9, 0.99), eps=1e-8, foreach=torch_foreach)
    for step in range(8):
        grads = [torch.randn(s) for s in shapes]
        for opt, ps in ((a, ours), (b, ref)):
            opt.zero_grad(set_to_none=True)
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            if step in (3, 4):  # a parameter without a gradient is skipped and keeps its own step count, as in torch
                ps[2].grad = None
            opt.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert [a.state[p]["t"] for p in ours] == [8, 8, 6, 8]
    a.param_groups[0]["lr"] = 0.0  # the worker's warm-up edits lr in place
    before = ours[0].detach().clone()
    ours[0].grad = torch.randn(shapes[0])
    a.step()
    torch.testing.assert_close(ours[0], before)


def test_building_it_imports_no_dynamo():
    import subprocess
    import sys

    code = ("import sys, torch; from model.optim import AdamW; p = torch.nn.Parameter(torch.ones(3)); "
            "o = AdamW([{'params': [p], 'lr': 1e-3}]); p.grad = torch.ones(3); o.step(); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
