"""Initial-noise optimisation (InitNO, ReNO): attention capture, scores, reward ascent, identities."""
import math

import pytest
import torch

from diffguide.noise import InitNO, NoiseContext, ReNO
from diffguide.noise.initno import kl, scores, smooth, subjects_of
from diffguide.noise.reno import norm_penalty, parse_rewards
from diffguide.pipelines import GuidedPipeline
from diffguide.pipelines import tiny
from diffguide.pipelines.attention import capture, choose, resolutions


@pytest.fixture(scope="module")
def builtin():
    return GuidedPipeline.from_pretrained("builtin", progress=False)


@pytest.fixture(scope="module")
def tiny_sd():
    return GuidedPipeline.from_pipe(tiny.sd(), progress=False)


def redness(images, prompts):
    return images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3))


# -- attention capture ---------------------------------------------------------------------------

def test_capture_shapes_and_model_unchanged(tiny_sd):
    net = tiny_sd.family.net
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = tiny_sd.family.encode(["a cat", "a dog"], None, 1, "cpu")[0]
    before = dict(net.attn_processors)
    with torch.no_grad():
        ref = tiny_sd.denoiser(x, torch.tensor(500.0), cond).x0
        grid = choose(net, (16, 16))
        assert grid in resolutions(net, (16, 16))
        with capture(net, grid) as store:
            inside = tiny_sd.denoiser(x, torch.tensor(500.0), cond).x0
        after = tiny_sd.denoiser(x, torch.tensor(500.0), cond).x0
    n = grid[0] * grid[1]
    tokens = cond["text"].shape[1]
    assert store["cross"] and store["self"]
    assert all(m.shape == (2, n, tokens) for m in store["cross"])
    assert all(m.shape == (2, n, n) for m in store["self"])
    for m in store["cross"] + store["self"]:  # rows are probability distributions
        torch.testing.assert_close(m.sum(-1), torch.ones(2, n))
    torch.testing.assert_close(inside, ref, atol=1e-5, rtol=1e-5)  # the explicit attention is the same maths
    assert dict(net.attn_processors) == before
    assert torch.equal(after, ref)


def test_capture_refuses_models_without_attention():
    with pytest.raises(ValueError, match="attention processors"):
        with capture(torch.nn.Linear(2, 2), (4, 4)):
            pass


# -- InitNO's pieces against closed forms ---------------------------------------------------------

def test_subjects_of():
    assert subjects_of("a red circle on a blue background") == ["circle"]
    assert subjects_of("a cat and a dog") == ["cat", "dog"]
    assert subjects_of("red disc, blue backdrop") == ["disc"]
    assert subjects_of("a photo of a cat wearing a hat") == ["cat", "hat"]
    assert subjects_of("a small green square and a yellow triangle") == ["square", "triangle"]
    assert subjects_of("on a blue background") == []


def test_scores_closed_form():
    h = w = 4
    keep = [1, 2, 3]  # ordinary tokens; 0 is the start token
    cross = torch.zeros(h * w, 5)
    cross[:, 0] = 10.0  # the start token is left out of the softmax
    cross[0, 1] = 1.0   # token 1 peaks at pixel 0; everything else is flat
    s_ca, s_sa = scores(cross, torch.eye(h * w), (h, w), keep, [0, 1])
    a = torch.full((h * w, 3), 1 / 3)
    a[0] = torch.softmax(torch.tensor([100.0, 0, 0]), 0)
    expect = max(1 - float(smooth(a[:, k].reshape(h, w)).max()) for k in (0, 1))
    assert float(s_ca) == pytest.approx(expect, abs=1e-6)
    assert float(s_sa) == 0.0  # S_CA > 0.5: the conflict term is gated off
    # two subjects whose self-attention maps coincide: overlap sum(min)/sum(a+b) = 1/2
    cross2 = torch.zeros(h * w, 4)
    cross2[5, 1] = cross2[6, 2] = 50.0
    self_ = torch.full((h * w, h * w), 1.0 / (h * w))
    s_ca2, s_sa = scores(cross2, self_, (h, w), [1, 2], [0, 1])
    assert float(s_ca2) < 0.5
    assert float(s_sa) == pytest.approx(0.5, abs=1e-5)
    # subjects at opposite corners whose self-attention stays home: no overlap after smoothing
    cross3 = torch.zeros(h * w, 4)
    cross3[0, 1] = 50.0
    cross3[15, 2] = 50.0
    sa = torch.zeros(h * w, h * w)
    sa[0, 0] = 1.0
    sa[15, 15] = 1.0
    s_ca3, s_sa3 = scores(cross3, sa, (h, w), [1, 2], [0, 1])
    assert float(s_ca3) < 0.5 and float(s_sa3) == pytest.approx(0.0, abs=1e-6)


def test_kl_closed_form():
    mu = torch.full((10,), 0.3)
    logvar = torch.full((10,), math.log(2.0))
    expect = 0.5 * (2.0 + 0.09 - 1 - math.log(2.0))  # KL(N(0.3, 2) || N(0, 1)) per element
    assert float(kl(mu, logvar)) == pytest.approx(expect, rel=1e-6)


def test_norm_penalty_minimum_at_chi_mode():
    d = 3 * 8 * 8
    for r in (0.8, 1.0, 1.2):
        z = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        z = (z / z.norm() * r * math.sqrt(d - 1)).requires_grad_(True)
        norm_penalty(z).sum().backward()
        radial = float((z.grad * z.detach()).sum() / z.detach().norm())  # d/dr of R at r: r - (d - 1) / r
        rr = r * math.sqrt(d - 1)
        assert radial == pytest.approx(rr - (d - 1) / rr, rel=1e-4, abs=1e-4)


# -- InitNO and ReNO through the pipeline ----------------------------------------------------------

def test_initno_scores_fall(builtin):
    opt = InitNO(iterations=1, rounds=1, final_iterations=0)
    seen = []

    class Spy(InitNO):
        def _run(self, ctx, i, z0, keep, subj, steps):
            att = ctx.attention

            def spy(x, j):
                out = att(x, j)
                s_ca, s_sa = scores(*out, keep, subj)
                seen.append(float((s_ca + s_sa).detach()))
                return out
            ctx.attention = spy
            return super()._run(ctx, i, z0, keep, subj, steps)

    spy = Spy(iterations=15, rounds=1, final_iterations=0, tau_cross=0.0, tau_self=0.0, lr=0.05)
    out = builtin("a red circle and a blue square", guidance="cfg:scale=3", steps=4, seed=3,
                  output_type="pt", noise_optimizer=spy)
    assert len(seen) == 15 and out.noise["nfe"] == 15 and out.noise["backward"] == 15
    assert min(seen[-5:]) < seen[0] - 0.02, seen
    assert opt.words("a red circle and a blue square") == ["circle", "square"]


def test_zero_iterations_equal_plain_run(builtin):
    plain = builtin(["a circle", "a red square"], guidance="cfg:scale=3", sampler="dpmpp_2m", steps=5,
                    seed=7, output_type="pt")
    for opt in (InitNO(iterations=0), ReNO(iterations=0), ReNO(iterations=1, reward=redness)):
        out = builtin(["a circle", "a red square"], guidance="cfg:scale=3", sampler="dpmpp_2m", steps=5,
                      seed=7, output_type="pt", noise_optimizer=opt)
        assert torch.equal(out.images, plain.images), opt


def test_reno_reward_rises_through_the_pipeline(builtin):
    seen = {}

    def spy(images, prompts):
        r = redness(images, prompts)
        seen.setdefault("first", r.detach())
        return r

    opt = ReNO(iterations=8, reward=spy)
    out = builtin(["a circle", "a square"], guidance="cfg:scale=3", sampler="ddim", steps=3, seed=0,
                  output_type="pt", noise_optimizer=opt)
    final = redness(out.images, None)
    assert (final > seen["first"] + 0.02).all(), (seen["first"], final)
    # the returned noise is the best iteration's: the final image scores what that iteration did
    torch.testing.assert_close(-final, torch.tensor(out.noise["reward_loss_best"]), atol=1e-4, rtol=0)
    assert out.noise["nfe"] == 8 * 3 * 2 and out.noise["backward"] == 7


def test_reno_norm_stays_near_its_prior():
    d = 3 * 16 * 16
    z0 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def render(x, rows):
        return x[:, :1].expand(-1, 3, -1, -1).sigmoid()

    ctx = NoiseContext(["a", "b"], 2.0, render=render)
    z, info = ReNO(iterations=50, reward=lambda im, p: 10 * im.mean((1, 2, 3))).optimise(ctx, z0 * 2.0)
    assert all(b < s - 0.5 for b, s in zip(info["reward_loss_best"], info["reward_loss_start"]))
    ratio = (z / 2.0).flatten(1).norm(dim=1) / math.sqrt(d)
    assert ((ratio > 0.9) & (ratio < 1.1)).all(), ratio
    # without the regulariser the same ascent drifts further from the prior radius
    z_free, _ = ReNO(iterations=50, regularization=0.0,
                     reward=lambda im, p: 10 * im.mean((1, 2, 3))).optimise(ctx, z0 * 2.0)
    free = (z_free / 2.0).flatten(1).norm(dim=1) / math.sqrt(d)
    assert ((free - 1).abs() >= (ratio - 1).abs()).all()


def test_reno_nan_reward_is_refused(builtin):
    def bad(images, prompts):
        return images.mean((1, 2, 3)) * float("nan")

    with pytest.raises(ValueError, match="rewards must be finite"):
        builtin("a circle", steps=2, seed=0, noise_optimizer=ReNO(iterations=2, reward=bad))


def test_initno_without_subject_is_refused(builtin):
    with pytest.raises(ValueError, match="no subject noun"):
        builtin("on a blue background", steps=2, seed=0, noise_optimizer="initno")
    with pytest.raises(ValueError, match="not a word of the prompt"):
        builtin("a circle", steps=2, seed=0, noise_optimizer="initno:subjects=dog")


def test_bad_options():
    with pytest.raises(ValueError, match="iterations must be an integer >= 0"):
        ReNO(iterations=-1)
    with pytest.raises(ValueError, match="lr must be a number > 0"):
        InitNO(lr=0)
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        ReNO(reward="nope")
    assert parse_rewards("toy:2") == [("toy", 2.0)]


def test_initno_needs_cross_attention():
    ctx = NoiseContext(["a cat"], 1.0)
    with pytest.raises(ValueError, match="needs attention"):
        InitNO().optimise(ctx, torch.zeros(1, 4, 8, 8))


# -- the CLI -------------------------------------------------------------------------------------

def test_cli_generate_and_eval_report_noise_costs(tmp_path, capsys):
    import json

    from diffguide.cli.main import main

    out = tmp_path / "a.png"
    assert main(["generate", "a red circle and a blue square", "--steps", "3", "--quiet", "-o", str(out),
                 "--initno", "iterations=2,rounds=1,final_iterations=0"]) == 0
    err = capsys.readouterr().err
    assert "8 network evaluations" in err  # 2 InitNO forwards + 3 steps x 2 (CFG)
    from PIL import Image
    meta = json.loads(Image.open(out).text["diffguide"])
    assert meta["noise_optimizer"] == "initno:iterations=2,rounds=1,final_iterations=0"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert main(["eval", "--prompts", str(prompts), "--n", "2", "--steps", "2", "--sampler", "ddim",
                 "--quiet", "--initno", "iterations=3,rounds=1,final_iterations=0,tau_cross=0"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["noise_optimizer"].startswith("initno:")
    assert res["nfe_per_image"] == 4 and res["noise_nfe_per_image"] == 3
    assert res["noise_backward_per_image"] == 3 and res["noise_seconds_per_image"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--reno", "bogus=1"], "has no option 'bogus'"),
    (["--reno", "reward=nope"], "unknown reward 'nope'"),
    (["--initno", "iterations=-2"], "iterations must be an integer >= 0"),
    (["--initno", "--reno"], "not allowed with argument"),
])
def test_cli_bad_noise_options(argv, message, tmp_path, capsys):
    from diffguide.cli.main import main

    code = main(["generate", "a red circle", "-o", str(tmp_path / "x.png"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


# -- the shipped reward model ----------------------------------------------------------------------

def test_reward_model_reads_the_world():
    """Trained on captions only; on fresh scenes the best-scoring of 300 images satisfies the caption
    for most captions, and a matching caption outscores a contradicting one on the same image."""
    from diffguide.toy import reward, scenes

    model = reward.load()
    assert reward.retrieval(model, seed=777, n=300) > 0.85
    imgs, _ = scenes.sample_for_prompt("a red circle on a blue background", 16, seed=5)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    right = model(x, ["a red circle on a blue background"] * 16)
    wrong = model(x, ["a green square on a white background"] * 16)
    assert (right > wrong).all()
    # it is a different network from the evaluator that eval scores with
    from diffguide.toy import evaluator
    assert not isinstance(model, type(evaluator.load()))


def test_reward_is_differentiable_in_the_image():
    from diffguide.toy import reward

    model = reward.load()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    model(x, ["a circle", "a red square"]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters())
