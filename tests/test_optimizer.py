import torch

from reprolora.training.optim import AdamW, learning_rate


def test_adamw_follows_torch_adamw():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(64, 8))]
    theirs = [torch.nn.Parameter(ours[0].detach().clone())]
    reference = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    optimizer = AdamW(ours, weight_decay=0.1)
    for _ in range(20):
        grad = torch.randn(64, 8)
        grad[0] = 0  # a row that never moves: sqrt(0) must stay 0, not nan
        ours[0].grad, theirs[0].grad = grad.clone(), grad.clone()
        optimizer.step(1e-2)
        reference.step()
    assert torch.isfinite(ours[0]).all()
    # 1 / rsqrt(x) and sqrt(x) differ in the last bit at most: the trajectories stay together.
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)


def test_schedule_warms_up_then_decays():
    lrs = [learning_rate(step, 10, 2, 1.0, "cosine") for step in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == 1.0 and lrs[-1] < 0.05
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    assert [learning_rate(s, 10, 0, 1.0, "constant") for s in (0, 9)] == [1.0, 1.0]
    assert learning_rate(5, 10, 0, 1.0, "linear") == 0.5
