"""A LoRA student on two real CPU processes (torchrun, gloo): the run ends bit-identical to one
process with the same effective batch (docs/distillation.md, "Several processes"), every process
ends with the same adapters, and the one LoRA file, written by the main process, loads onto the
teacher's pipeline as the merged student."""

import os
import subprocess
import sys

import pytest
import torch

from diffguide.distill import checkpoint
from diffguide.distill.trainer import DistillConfig, train
from diffguide.pipelines import tiny as tm
from helpers import caption_folder, states_equal

pytest.importorskip("peft")

LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
# the CLI run on each process, its adapters as each process ends the run saved beside it
WRAPPER = """
import os, sys, torch
from diffguide.cli.main import main
from diffguide.distill import run
from diffguide.distill.methods import network_state

real, runs = run.Run.__init__, []

def keep(self, *a, **kw):
    real(self, *a, **kw)
    runs.append(self)

run.Run.__init__ = keep
code = main(sys.argv[1:])
r = runs[0]
rank, student = r.acc.process_index, r.acc.unwrap_model(r.method.student)
states = {"student": network_state(student), "ema": network_state(r.ema)}
torch.save(states, os.path.join(os.environ["ADAPTERS"], f"rank{rank}.pt"))
sys.exit(code)
"""
# the run, as CLI arguments and as the one-process reference's settings (its batch split in two)
ARGS = ["--lora-rank", "4", "--batch", "2", "--max-steps", "3", "--checkpoint-every", "2"]
ARGS += ["--log-every", "1", "--skip", "100", "--lr", "1e-2", "--ema", "0.5"]
ARGS += ["--validate-n", "1", "--validate-prompts", "1", "--quiet"]
CONFIG = dict(lora_rank=4, batch=2, max_steps=3, checkpoint_every=2, log_every=1, skip=100)
CONFIG.update(lr=1e-2, ema=0.5, validate_n=1, validate_prompts=1)


@pytest.fixture
def one_thread():
    """The one-process reference runs with the launched processes' thread count: CPU kernels sum
    in another order on another number of threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _lora_file(out) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "lora", "pytorch_lora_weights.safetensors"))


def test_lora_two_processes_equal_one_with_accumulation(tmp_path, one_thread):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    teacher = tm.save(str(tmp_path / "t"), "pixel_sd")
    data = caption_folder(tmp_path / "data", 8)
    out, adapters = tmp_path / "two", tmp_path / "adapters"
    adapters.mkdir()
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    argv = ["distill", "consistency", "--teacher", teacher, "--data", data, "--out", str(out)]
    res = subprocess.run(
        [*LAUNCH, str(script), *argv, *ARGS],
        env={**ENV, "ADAPTERS": str(adapters)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines() == [str(out / "student")]  # printed once
    # one LoRA file, nothing left aside; the same adapters on both processes
    assert os.listdir(out / "lora") == ["pytorch_lora_weights.safetensors"]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    ranks = [torch.load(adapters / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["student"] and states_equal(ranks[0], ranks[1], ())
    # bit-identical to one process with two accumulated micro-batches of the same size
    train(
        DistillConfig(
            out=str(tmp_path / "one"), teacher=teacher, data=data, grad_accum=2, **CONFIG
        ),
        progress=False,
    )
    a = checkpoint.load(str(out / "checkpoint.pt"))
    b = checkpoint.load(str(tmp_path / "one" / "checkpoint.pt"))
    assert (a["processes"], b["processes"], a["step"]) == (2, 1, 3)
    assert states_equal(a, b, ("config", "processes"))
    assert states_equal({"ema": a["ema"]}, {"ema": ranks[0]["ema"]}, ())  # rank 0's checkpoint
    la, lb = _lora_file(out), _lora_file(tmp_path / "one")
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert any(v.abs().max() > 0 for k, v in la.items() if "lora_B" in k)  # it trained
    # the LoRA on the teacher's pipeline is the merged student
    unet = UNet2DConditionModel.from_pretrained(str(out / "student" / "unet"))
    none = dict(vae=None, safety_checker=None, feature_extractor=None)
    pipe = StableDiffusionPipeline.from_pretrained(teacher, **none)
    pipe.load_lora_weights(str(out / "lora"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 4, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        ys = [
            m(x, torch.tensor([499, 899]), encoder_hidden_states=text).sample
            for m in (pipe.unet, unet)
        ]
    torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=1e-5)
