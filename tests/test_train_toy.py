"""Training the toy model: reproducible from its seed, and resuming gives the same weights."""

import json
import os

import torch

from diffguide.pipelines import GuidedPipeline, toy_model


def _cfg(out, steps):
    return toy_model.TrainConfig(
        out=str(out),
        size="small",
        steps=steps,
        batch=4,
        dataset=32,
        checkpoint_every=2,
        log_every=1,
        warmup=2,
    )


def _weights(run):
    state = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False)
    return state["step"], state["ema_unet"], state["unet"]


def test_resume_equals_straight_run(tmp_path):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    toy_model.train(_cfg(straight, 4), progress=False)
    toy_model.train(_cfg(resumed, 2), progress=False)
    folder = toy_model.train(_cfg(resumed, 4), progress=False)  # picks up at step 2
    (sa, ea, wa), (sb, eb, wb) = _weights(straight), _weights(resumed)
    assert sa == sb == 4
    assert all(torch.equal(wa[k], wb[k]) and torch.equal(ea[k], eb[k]) for k in wa)
    log = [json.loads(line) for line in open(resumed / "loss.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in log)
    gp = GuidedPipeline.from_pretrained(folder, progress=False)  # the export is a diffusers folder
    assert gp("a red circle", steps=2, seed=0, output_type="np").images.shape == (1, 32, 32, 3)


def test_tokenizer_spells_every_caption_word_as_one_token():
    from diffguide.toy import scenes

    tok = toy_model.tokenizer()
    for w in scenes.vocabulary():
        assert len(tok(w).input_ids) == 3, w  # start, the word, end


def test_the_rate_decays_from_decay_from_to_zero_at_the_last_step():
    """--decay-from K: the warm-up's rate until step K, then lr (1 + cos(pi (step - K) / (steps -
    K))) / 2; without it the rate stays at lr after the warm-up."""
    import math

    from diffguide.toy.training import TrainConfig, rate

    cfg = TrainConfig(out="x", lr=1e-3, warmup=10, steps=300, decay_from=100)
    assert math.isclose(rate(cfg, 0), 1e-4) and rate(cfg, 99) == 1e-3
    assert math.isclose(rate(cfg, 200), 0.5e-3) and rate(cfg, 300) == 0
    assert math.isclose(rate(cfg, 150), 1e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert rate(TrainConfig(out="x", lr=1e-3, warmup=10, steps=300), 299) == 1e-3


def test_decay_from_outside_the_run_is_refused(tmp_path, capsys):
    from diffguide.cli.main import main

    assert main(["train-toy", str(tmp_path), "--steps", "10", "--decay-from", "10"]) == 2
    err = capsys.readouterr().err
    assert "--decay-from" in err and "Traceback" not in err and not list(tmp_path.iterdir())
