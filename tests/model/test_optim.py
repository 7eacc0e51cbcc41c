import torch

from model.optim import AdamW


def test_matches_torch_adamw_over_several_steps():
    torch.manual_seed(0)
    shapes = [(5, 3), (7,), (2, 2, 2)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    groups = lambda ps: [{"params": ps[:1], "lr": 1e-2, "weight_decay": 0.1},  # noqa: E731
                         {"params": ps[1:], "lr": 3e-3, "weight_decay": 0.0}]
    a = AdamW(groups(ours), betas=(0.9, 0.99), eps=1e-8)
    b = torch.optim.AdamW(groups(ref), betas=(0.9, 0.99), eps=1e-8, foreach=False)
    for step in range(6):
        grads = [torch.randn(s) for s in shapes]
        for opt, ps in ((a, ours), (b, ref)):
            opt.zero_grad(set_to_none=True)
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            if step == 3:  # a parameter without a gradient is skipped, as in torch
                ps[2].grad = None
            opt.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    a.param_groups[0]["lr"] = 0.0  # the worker's warm-up edits lr in place
    before = ours[0].detach().clone()
    ours[0].grad = torch.randn(shapes[0])
    a.step()
    torch.testing.assert_close(ours[0], before)
