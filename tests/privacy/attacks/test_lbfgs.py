import torch

from simfl.privacy.attacks.lbfgs import batched_lbfgs


def rosenbrock(z):
    return (100 * (z[..., 1:] - z[..., :-1] ** 2) ** 2 + (1 - z[..., :-1]) ** 2).sum(-1)


def objective(z):
    z = z.detach().requires_grad_(True)
    f = rosenbrock(z)
    (g,) = torch.autograd.grad(f.sum(), z)
    return f.detach(), g


def start():
    return torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.5


def test_each_row_follows_torch_lbfgs_without_line_search():
    z0 = start()
    z, f, done = batched_lbfgs(objective, z0, iterations=10, lr=1.0, history_size=5)
    assert done.tolist() == [10] * 4
    for row in range(4):
        p = z0[row].clone().requires_grad_(True)
        opt = torch.optim.LBFGS([p], lr=1.0, max_iter=10, max_eval=10**6, history_size=5)
        visited = []

        def closure(opt=opt, p=p, visited=visited):
            opt.zero_grad()
            loss = rosenbrock(p)
            loss.backward()
            visited.append((float(loss.detach()), p.detach().clone()))
            return loss

        opt.step(closure)
        visited.append((float(rosenbrock(p.detach())), p.detach().clone()))  # torch skips the last evaluation
        best_f, best_z = min(visited, key=lambda v: v[0])
        # without a line search the objective is not monotone: both keep the best iterate
        assert len({round(v[0], 6) for v in visited}) > 5
        assert torch.allclose(z[row], best_z, atol=1e-10)
        assert abs(float(f[row]) - best_f) < 1e-10


def test_rows_do_not_influence_each_other():
    z0 = start()
    together, f_together, steps = batched_lbfgs(objective, z0, iterations=40, history_size=5)
    for row in range(4):
        alone, f_alone, alone_steps = batched_lbfgs(objective, z0[row : row + 1], iterations=40, history_size=5)
        assert steps[row] == alone_steps[0]
        assert torch.allclose(together[row], alone[0], atol=1e-12)
        assert torch.allclose(f_together[row], f_alone[0], atol=1e-12)


def test_keeps_the_best_point_when_fixed_steps_diverge():
    curvature = torch.tensor([1.0, 10.0, 100.0])

    def quadratic(z):
        return (curvature * z**2).sum(-1), 2 * curvature * z

    z0 = torch.ones(2, 3)
    # lr 3 overshoots every quasi-Newton step: the objective grows until it overflows
    z, f, done = batched_lbfgs(quadratic, z0, iterations=300, lr=3.0)
    assert (done < 300).all()  # stopped once the rows blew up
    assert torch.equal(z, z0) and torch.equal(f, quadratic(z0)[0])


def test_each_row_counts_its_own_iterations():
    def quadratic(z):
        return (z**2).sum(-1), 2 * z

    z0 = torch.tensor([[0.0, 0.0], [1.0, -2.0]])  # row 0 starts at the minimum
    _, _, steps = batched_lbfgs(quadratic, z0, iterations=50)
    assert steps[0] == 0 and 0 < steps[1] < 50
