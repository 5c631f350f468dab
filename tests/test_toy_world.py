"""The toy world (scenes, captions, prompts), its evaluator and the metrics built on them."""

import numpy as np
import pytest

from diffguide.toy import evaluator as ev
from diffguide.toy import metrics, scenes


def test_scenes_are_deterministic_and_seeded():
    a, b = scenes.example(3, 17), scenes.example(3, 17)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    c = scenes.example(4, 17)
    assert not np.array_equal(a[0], c[0])
    assert (
        a[0].shape == (32, 32, 3)
        and a[0].dtype == np.float32
        and 0 <= a[0].min() <= a[0].max() <= 1
    )


def test_labels_match_pixels_and_captions_match_scenes():
    for i in range(300):
        img, cap, sc = scenes.example(0, i)
        jit = np.asarray(sc.jitter)
        bg = (np.asarray(scenes.BACKGROUNDS[sc.background]) + jit[-1]).clip(0, 255) / 255
        assert np.allclose(img[0, 0], bg, atol=1e-6)  # corners are background
        for o, j in zip(sc.objects, jit):
            if o.shape in ("circle", "square", "diamond", "cross"):  # these cover their centre
                centre = img[int(o.y), int(o.x)]
                colour = (np.asarray(scenes.COLOURS[o.colour]) + j).clip(0, 255) / 255
                assert np.allclose(centre, colour, atol=0.02)
        p = scenes.parse_prompt(cap)
        assert metrics.check(p, sc.pairs, sc.background)["all"], (cap, sc)


def test_held_out_pairs_only_outside_training():
    train = [scenes.random_scene(scenes.scene_rng(0, i), train=True) for i in range(3000)]
    assert not any(pair in scenes.HELD_OUT for s in train for pair in s.pairs)
    full = [scenes.random_scene(scenes.scene_rng(0, i), train=False) for i in range(3000)]
    assert any(pair in scenes.HELD_OUT for s in full for pair in s.pairs)


@pytest.mark.parametrize("text", metrics.DEFAULT_PROMPTS)
def test_true_samples_satisfy_their_prompt(text):
    p = scenes.parse_prompt(text)
    imgs, scs = scenes.sample_for_prompt(p, 6, seed=2)
    assert imgs.shape == (6, 32, 32, 3)
    assert all(metrics.check(p, s.pairs, s.background)["all"] for s in scs)
    assert len({s.objects for s in scs}) == 6  # free attributes, size and position vary


@pytest.mark.parametrize(
    "text,msg",
    [
        ("a red hexagon", "unknown word 'hexagon'"),
        ("a red", "not followed by a shape"),
        ("a circle, a square and a cross", "names 3 shapes"),
        ("on a white background", "names 0 shapes"),
    ],
)
def test_bad_prompts(text, msg):
    with pytest.raises(ValueError, match=msg):
        scenes.parse_prompt(text)


def test_parse_prompt_binds_colours_and_background():
    p = scenes.parse_prompt("An orange Rhombus and a blue disc on a blue background")
    assert p.objects == (("orange", "diamond"), ("blue", "circle")) and p.background == "blue"
    assert scenes.parse_prompt("gray background with a red plus").background == "gray"


def test_frechet_against_scipy():
    from scipy import linalg

    g = np.random.default_rng(0)
    f1, f2 = g.normal(size=(400, 5)), g.normal(size=(300, 5)) @ g.normal(size=(5, 5)) + 1
    m1, m2, c1, c2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    ref = ((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert abs(metrics.frechet(f1, f2) - ref) < 1e-6 * max(1, ref)
    assert abs(metrics.frechet(f1, f1)) < 1e-8


@pytest.fixture(scope="module")
def judge():
    return ev.load()


def test_evaluator_accuracy_on_fresh_scenes(judge):
    """Exact match (every colour-shape pair and the background) on scenes it was not trained on."""
    assert ev.accuracy(judge, seed=777, n=1000) >= 0.98


def test_metrics_move_the_right_way(judge):
    prompts = metrics.DEFAULT_PROMPTS
    ids = np.repeat(np.arange(len(prompts)), 6)
    true = np.concatenate(
        [scenes.sample_for_prompt(p, 6, seed=50 + k)[0] for k, p in enumerate(prompts)]
    )
    good = metrics.evaluate(true, ids, prompts, judge)
    noise = np.random.default_rng(0).uniform(0, 1, true.shape).astype(np.float32)
    bad = metrics.evaluate(noise, ids, prompts, judge)
    assert good["adherence"] >= 0.95 and bad["adherence"] <= 0.1
    assert bad["frechet_distance"] > 20 * max(good["frechet_distance"], 1e-3)
    # true images against other true images: the colour numbers sit at their reference level
    assert (
        good["colour_error"] < 0.1 and abs(good["colour_error"] - good["true_colour_error"]) < 0.02
    )
    assert abs(good["saturation_error"]) < 0.05 and bad["colour_error"] > 2 * good["colour_error"]
    assert 0.5 < good["diversity"] / good["true_diversity"] < 2
    keys = {
        "images",
        "adherence",
        "adherence_by_group",
        "attribute_accuracy",
        "frechet_distance",
        "colour_error",
        "saturation_error",
        "background_error",
        "diversity",
        "true_diversity",
        "adherence_by_prompt",
        "objects_measured",
    }
    assert keys <= set(good)
    assert set(good["adherence_by_group"]) == {"single", "two", "held_out"}


def test_oversaturation_is_measured():
    """Push colours away from grey: the saturation error turns positive."""
    p = [scenes.parse_prompt("a red circle on a gray background")] * 8
    imgs = scenes.sample_for_prompt(p[0], 8, seed=3)[0]
    mean = imgs.mean(-1, keepdims=True)
    loud = np.clip(mean + 1.6 * (imgs - mean), 0, 1)
    assert (
        metrics.colour_fidelity(loud, p)["saturation_error"]
        > 0.05
        > abs(metrics.colour_fidelity(imgs, p)["saturation_error"])
    )
