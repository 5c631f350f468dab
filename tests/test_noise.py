"""Initial-noise optimisation (InitNO, ReNO): attention capture, scores, reward ascent,
identities."""

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
    torch.testing.assert_close(
        inside, ref, atol=1e-5, rtol=1e-5
    )  # the explicit attention is the same maths
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
    cross[0, 1] = 1.0  # token 1 peaks at pixel 0; everything else is flat
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
        radial = float(
            (z.grad * z.detach()).sum() / z.detach().norm()
        )  # d/dr of R at r: r - (d - 1) / r
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
    out = builtin(
        "a red circle and a blue square",
        guidance="cfg:scale=3",
        steps=4,
        seed=3,
        output_type="pt",
        noise_optimizer=spy,
    )
    assert len(seen) == 15 and out.noise["nfe"] == 15 and out.noise["backward"] == 15
    assert min(seen[-5:]) < seen[0] - 0.02, seen
    assert opt.words("a red circle and a blue square") == ["circle", "square"]


def test_zero_iterations_equal_plain_run(builtin):
    plain = builtin(
        ["a circle", "a red square"],
        guidance="cfg:scale=3",
        sampler="dpmpp_2m",
        steps=5,
        seed=7,
        output_type="pt",
    )
    for opt in (InitNO(iterations=0), ReNO(iterations=0), ReNO(iterations=1, reward=redness)):
        out = builtin(
            ["a circle", "a red square"],
            guidance="cfg:scale=3",
            sampler="dpmpp_2m",
            steps=5,
            seed=7,
            output_type="pt",
            noise_optimizer=opt,
        )
        assert torch.equal(out.images, plain.images), opt


def test_reno_reward_rises_through_the_pipeline(builtin):
    seen = {}

    def spy(images, prompts):
        r = redness(images, prompts)
        seen.setdefault("first", r.detach())
        return r

    opt = ReNO(iterations=8, reward=spy)
    out = builtin(
        ["a circle", "a square"],
        guidance="cfg:scale=3",
        sampler="ddim",
        steps=3,
        seed=0,
        output_type="pt",
        noise_optimizer=opt,
    )
    final = redness(out.images, None)
    assert (final > seen["first"] + 0.02).all(), (seen["first"], final)
    # the returned noise is the best iteration's: the final image scores what that iteration did
    torch.testing.assert_close(
        -final, torch.tensor(out.noise["reward_loss_best"]), atol=1e-4, rtol=0
    )
    assert out.noise["nfe"] == 8 * 3 * 2 and out.noise["backward"] == 7


def test_reno_norm_stays_near_its_prior():
    d = 3 * 16 * 16
    z0 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def render(x, rows):
        return x[:, :1].expand(-1, 3, -1, -1).sigmoid()

    ctx = NoiseContext(["a", "b"], 2.0, render=render)
    z, info = ReNO(iterations=50, reward=lambda im, p: 10 * im.mean((1, 2, 3))).optimise(
        ctx, z0 * 2.0
    )
    assert all(b < s - 0.5 for b, s in zip(info["reward_loss_best"], info["reward_loss_start"]))
    ratio = (z / 2.0).flatten(1).norm(dim=1) / math.sqrt(d)
    assert ((ratio > 0.9) & (ratio < 1.1)).all(), ratio
    # without the regulariser the same ascent drifts further from the prior radius
    z_free, _ = ReNO(
        iterations=50, regularization=0.0, reward=lambda im, p: 10 * im.mean((1, 2, 3))
    ).optimise(ctx, z0 * 2.0)
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
    assert (
        main(
            [
                "generate",
                "a red circle and a blue square",
                "--steps",
                "3",
                "--quiet",
                "-o",
                str(out),
                "--initno",
                "iterations=2,rounds=1,final_iterations=0",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "8 network evaluations" in err  # 2 InitNO forwards + 3 steps x 2 (CFG)
    from PIL import Image

    meta = json.loads(Image.open(out).text["diffguide"])
    assert meta["noise_optimizer"] == "initno:iterations=2,rounds=1,final_iterations=0"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert (
        main(
            [
                "eval",
                "--prompts",
                str(prompts),
                "--n",
                "2",
                "--steps",
                "2",
                "--sampler",
                "ddim",
                "--quiet",
                "--initno",
                "iterations=3,rounds=1,final_iterations=0,tau_cross=0",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["noise_optimizer"].startswith("initno:")
    assert res["nfe_per_image"] == 4 and res["noise_nfe_per_image"] == 3
    assert res["noise_backward_per_image"] == 3 and res["noise_seconds_per_image"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reno", "bogus=1"], "has no option 'bogus'"),
        (["--reno", "reward=nope"], "unknown reward 'nope'"),
        (["--initno", "iterations=-2"], "iterations must be an integer >= 0"),
        (["--initno", "--reno"], "not allowed with argument"),
    ],
)
def test_cli_bad_noise_options(argv, message, tmp_path, capsys):
    from diffguide.cli.main import main

    code = main(["generate", "a red circle", "-o", str(tmp_path / "x.png"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


# -- the shipped reward model ----------------------------------------------------------------------


def test_reward_model_reads_the_world():
    """Trained on captions only; on fresh scenes the best-scoring of 300 images satisfies the
    caption
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


# -- to the letter of the authors' code (issue 23) -------------------------------------------------


def _authors_smoothing(m):
    """InitNO's utils/gaussian_smoothing.py, re-derived: a 3x3 kernel, the product over both axes of
    1/(sigma sqrt(2 pi)) exp(-((x - mean) / (2 sigma))^2) at sigma 0.5, normalised; reflected
    borders."""
    sigma, size = 0.5, 3
    ax = torch.arange(size, dtype=torch.float64)
    g = (
        1
        / (sigma * math.sqrt(2 * math.pi))
        * torch.exp(-(((ax - (size - 1) / 2) / (2 * sigma)) ** 2))
    )
    k = g[:, None] * g[None, :]
    k = k / k.sum()
    padded = torch.nn.functional.pad(m[None, None].double(), (1, 1, 1, 1), mode="reflect")
    return torch.nn.functional.conv2d(padded, k[None, None])[0, 0]


def _authors_scores(cross, self_, res, indices):
    """fn_compute_loss of pipeline_sd_initno.py without its Otsu term: cross [res*res, 77] over the
    whole padded sequence, columns 1..-1 softmaxed at temperature 1/100, indices shifted by one."""
    maps = torch.softmax(cross.double().reshape(res, res, -1)[:, :, 1:-1] * 100, dim=-1)
    tops, selfs = [], []
    for i in [j - 1 for j in indices]:
        m = _authors_smoothing(maps[:, :, i])
        flat = int(m.flatten().argmax())
        tops.append(m[flat // res, flat % res])
        selfs.append(
            _authors_smoothing(
                self_.double().reshape(res, res, res * res)[flat // res, flat % res].view(res, res)
            )
        )
    s_ca = max(max(0.0, 1.0 - float(v)) for v in tops)
    pairs = [(a, b) for a in range(len(selfs)) for b in range(a + 1, len(selfs))]
    s_sa = sum(
        float(torch.min(selfs[a], selfs[b]).sum() / ((selfs[a] + selfs[b]).sum() + 1e-6))
        for a, b in pairs
    ) / max(len(pairs), 1)
    return s_ca, (0.0 if s_ca > 0.5 else s_sa)


def test_initno_kernel_is_the_authors():
    m = torch.zeros(5, 5)
    m[2, 2] = 1.0
    assert float(smooth(m)[2, 2]) == pytest.approx(
        0.332, abs=1e-3
    )  # exp(-x^2): not exp(-2 x^2)'s 0.619
    r = torch.rand(7, 9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(smooth(r).double(), _authors_smoothing(r), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_initno_scores_equal_the_authors_on_random_maps(seed):
    g = torch.Generator().manual_seed(seed)
    res, T = 8, 77
    sharp = 1 + 30 * torch.rand(1, generator=g)  # from flat maps (S_CA gated) to peaked ones
    cross = torch.softmax(torch.randn(res * res, T, generator=g) * sharp, -1)
    self_ = torch.softmax(torch.randn(res * res, res * res, generator=g) * 3, -1)
    indices = sorted(
        torch.randperm(6, generator=g)[:3].add(2).tolist()
    )  # token positions, as get_indices'
    s_ca, s_sa = scores(cross, self_, (res, res), None, [p - 1 for p in indices])
    a_ca, a_sa = _authors_scores(cross, self_, res, indices)
    assert float(s_ca) == pytest.approx(a_ca, abs=1e-6) and float(s_sa) == pytest.approx(
        a_sa, abs=1e-6
    )


def test_initno_padded_token_range_is_the_default(builtin):
    """The default softmax runs over every position but the first and last of the padded sequence;
    the prompt-only range is an option."""
    seen = {}

    class Spy(InitNO):
        def _run(self, ctx, i, z0, keep, subj, steps):
            seen[self.tokens] = (keep, subj)
            return z0, 0.0, True

    for tokens in ("padded", "prompt"):
        builtin(
            "a red circle and a blue square", steps=2, seed=0, noise_optimizer=Spy(tokens=tokens)
        )
    keep, subj = seen["padded"]
    pkeep, psubj = seen["prompt"]
    assert keep is None and subj == [pkeep[k] - 1 for k in psubj]
    with pytest.raises(ValueError, match="tokens must be padded or prompt"):
        InitNO(tokens="all")


def test_initno_attention_time_is_the_first_of_a_50_step_grid():
    """SD's leading DDIM grid: 981 at 50 steps, 751 at 4 (the run's own, with attention_steps=0)."""
    builtin = GuidedPipeline.from_pipe(tiny.sd(scheduler="DDIMScheduler"), progress=False)
    times = []
    net = builtin.family.net
    hook = net.register_forward_pre_hook(
        lambda m, a, k: times.append(float(a[1] if len(a) > 1 else k["timestep"])), with_kwargs=True
    )
    try:
        builtin(
            "a red circle",
            steps=4,
            seed=0,
            guidance="none",
            noise_optimizer=InitNO(iterations=1, rounds=1, final_iterations=0, tau_cross=0.0),
        )
        first = times[0]
        times.clear()
        builtin(
            "a red circle",
            steps=4,
            seed=0,
            guidance="none",
            noise_optimizer=InitNO(
                iterations=1, rounds=1, final_iterations=0, tau_cross=0.0, attention_steps=0
            ),
        )
        own = times[0]
    finally:
        hook.remove()
    expect = float(builtin.info.schedule.model_time(builtin.info.timesteps(50)[0]))
    run = float(builtin.info.schedule.model_time(builtin.info.timesteps(4)[0]))
    assert (
        first == pytest.approx(expect) and own == pytest.approx(run) and (expect, run) == (981, 751)
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.Generator().manual_seed(11),
        lambda: [torch.Generator().manual_seed(11 + i) for i in range(2)],
    ],
)
def test_noise_optimisers_repeat_with_generators(builtin, make):
    """generator= (one, or one per image) drives every draw: InitNO's restarts and ReNO's renders
    under
    a stochastic sampler repeat bit for bit, and ReNO's image is the one whose reward it reports."""
    initno = InitNO(
        iterations=1, rounds=3, final_iterations=1, tau_cross=0.0
    )  # never passes: restarts
    runs = [
        builtin(
            ["a red circle and a blue square"] * 2,
            steps=3,
            generator=make(),
            output_type="pt",
            noise_optimizer=initno,
        ).images
        for _ in range(2)
    ]
    assert torch.equal(*runs)
    reno = ReNO(iterations=3, reward=redness)
    outs = [
        builtin(
            ["a circle", "a square"],
            sampler="euler_ancestral",
            steps=3,
            generator=make(),
            output_type="pt",
            noise_optimizer=reno,
        )
        for _ in range(2)
    ]
    assert torch.equal(outs[0].images, outs[1].images)
    torch.testing.assert_close(
        -redness(outs[0].images, None),
        torch.tensor(outs[0].noise["reward_loss_best"]),
        atol=1e-4,
        rtol=0,
    )


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


@pytest.mark.parametrize("k", [1, 3])
def test_reno_nan_gradient_keeps_the_best_earlier_noise(k):
    z0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    def render(x, rows):
        seen.append(x.detach().clone())
        return x[:, :1].expand(-1, 3, -1, -1).sigmoid()

    def reward(images, prompts):
        r = 10 * images.mean((1, 2, 3))
        return (
            _NanGrad.apply(r) if len(seen) == k + 1 else r
        )  # finite value, NaN gradient at iteration k

    ctx = NoiseContext(["a", "b"], 1.0, render=render)
    z, info = ReNO(iterations=10, reward=reward).optimise(ctx, z0)
    assert len(seen) == k + 1 and torch.isfinite(z).all()  # stopped there, every image
    values = torch.stack(
        [-10 * torch.sigmoid(x[:, :1]).mean((1, 2, 3)) for x in seen]
    )  # reward loss per iteration
    best = values.argmin(0)
    for j in range(2):
        assert torch.equal(z[j], seen[int(best[j])][j])
    assert info["stopped"] == [{"iteration": k, "reason": "non-finite gradient"}] * 2


def test_reno_nonfinite_reward_later_stops_that_image_only():
    z0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    calls = []

    def render(x, rows):
        return x[:, :1].expand(-1, 3, -1, -1).sigmoid()

    def reward(images, prompts):
        calls.append(1)
        r = 10 * images.mean((1, 2, 3))
        if len(calls) == 3:
            r = torch.stack([r[0], r[1] * float("nan")])
        return r

    z, info = ReNO(iterations=6, reward=reward).optimise(
        NoiseContext(["a", "b"], 1.0, render=render), z0
    )
    assert info["stopped"][0] is None and info["stopped"][1] == {
        "iteration": 2,
        "reason": "non-finite reward",
    }
    assert len(calls) == 6 and torch.isfinite(z).all()


SUBJECTS = {
    "a cat sitting on a mat": ["cat", "mat"],
    "an astronaut riding a horse": ["astronaut", "horse"],
    "a red circle above a blue square": ["circle", "square"],
    "a red circle on a blue background": ["circle"],
    "a cat and a dog": ["cat", "dog"],
    "a photo of a cat wearing a hat": ["cat", "hat"],
    "a small green square and a yellow triangle": ["square", "triangle"],
    "a running dog": ["dog"],
    "a building next to a tree": ["building", "tree"],
    "a dog tied to a post": ["dog", "post"],
    "a cat to the left of a dog": ["cat", "dog"],
    "a man holding an umbrella": ["man", "umbrella"],
    "a bowl of fruit on a wooden table": ["bowl", "fruit", "table"],
    "two cats sleeping on a sofa": ["cats", "sofa"],
    "a car parked in front of a house": ["car", "house"],
    "a painting of a sunflower": ["sunflower"],
    "a teddy bear is sitting on a bench": ["bear", "bench"],
    "an oil painting of a fox": ["fox"],
    "a glass filled with orange juice": ["glass", "juice"],
    "red disc, blue backdrop": ["disc"],
}


def test_subject_finder_on_twenty_prompts():
    assert {p: subjects_of(p) for p in SUBJECTS} == SUBJECTS


def test_initno_reports_its_subjects(builtin, tmp_path, capsys):
    from diffguide.cli.main import main

    out = builtin(
        "an astronaut riding a horse",
        steps=2,
        seed=0,
        output_type="pt",
        noise_optimizer=InitNO(iterations=1, rounds=1, final_iterations=0),
    )
    assert out.noise["subjects"] == [["astronaut", "horse"]]
    assert (
        main(
            [
                "generate",
                "a cat sitting on a mat",
                "--model",
                "builtin",
                "--steps",
                "2",
                "--initno",
                "iterations=1,rounds=1,final_iterations=0",
                "-o",
                str(tmp_path / "x.png"),
            ]
        )
        == 0
    )
    assert "InitNO subjects: cat, mat" in capsys.readouterr().err


def test_eval_with_one_image_reports_undefined_statistics(tmp_path, capsys):
    """`diffguide eval --n 1` on one prompt: exit 0; FD and diversity null, each with its reason."""
    import json

    from diffguide.cli.main import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert (
        main(
            [
                "eval",
                "--model",
                "builtin",
                "--n",
                "1",
                "--prompts",
                str(prompts),
                "--steps",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 1 and res["frechet_distance"] is None and res["diversity"] is None
    assert "at least 2 images" in res["frechet_distance_undefined"] and res["diversity_undefined"]
