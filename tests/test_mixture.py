"""The Gaussian-mixture fixture: exact scores and posterior means, checked independently."""

import math

import torch


def _log_density(gm, x, a, s, labels):
    """log p_t(x | label) written directly from the mixture (not via the posterior mean)."""
    out = []
    for xi, y in zip(x, labels):
        terms = []
        for mu, c, w, k in zip(gm.means, gm.stds, gm.weights, gm.labels):
            if y >= 0 and k != y:
                continue
            var = a * a * c * c + s * s
            terms.append(
                torch.log(w)
                - 0.5 * ((xi - a * mu) ** 2).sum() / var
                - 0.5 * gm.dim * torch.log(2 * math.pi * var)
            )
        out.append(torch.logsumexp(torch.stack(terms), 0))
    return torch.stack(out)


def test_scores_match_autograd(gmm, sd):
    t = torch.tensor(420.0, dtype=torch.float64)
    a, s = sd.alpha(t), sd.sigma(t)
    labels = torch.tensor([0, 3, -1, -1])
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(_log_density(gmm, x, a, s, labels).sum(), x)
    assert torch.allclose(gmm.score(x.detach(), t, labels), grad, atol=1e-10)


def test_posterior_mean_by_monte_carlo(gmm, sd):
    """E[x0 | x_t] against importance-weighted exact draws of x0."""
    t = torch.tensor(600.0, dtype=torch.float64)
    a, s = float(sd.alpha(t)), float(sd.sigma(t))
    x = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    x0 = gmm.sample_data(400000, torch.tensor([1]).expand(400000), torch.Generator().manual_seed(0))
    w = torch.softmax(-((x - a * x0) ** 2).sum(1) / (2 * s * s), 0)
    mc = (w[:, None] * x0).sum(0)
    assert torch.allclose(gmm.posterior_mean(x, a, s, torch.tensor([1]))[0], mc, atol=5e-3)
