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
