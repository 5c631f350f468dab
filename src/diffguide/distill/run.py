"""One distillation run on accelerate, the same loop for every method (``methods.py``).

Every micro-batch draws its randomness from a generator seeded by (seed, step, micro-batch) and its
examples from a fixed per-epoch permutation, so a run resumed from a checkpoint repeats exactly the
steps it would have taken. Checkpoints are atomic and checksummed (``checkpoint.py``). Several
processes (``torchrun``, ``accelerate launch``): gradients are averaged across them and the
effective batch is batch x processes x grad_accum.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict

import numpy as np
import torch

from ..files import trim_log, write_json
from ..toy.training import cosine_decay
from . import checkpoint
from .config import DistillConfig
from .data import batches, load_data
from .export import export, export_lora, validate
from .methods import (
    Update,
    check_lora,
    create,
    load_network_state,
    method_class,
    network_state,
)

RUN_FILES = (
    "config.json",
    "loss.jsonl",
    "val.jsonl",
    "val",
    "student",
    "lora",
)  # what a run writes beside checkpoint.pt


class Run:
    """A method's networks on the accelerator: prepared (DDP on several processes), stepped with
    accumulation and clipping, averaged into the EMA, saved and loaded for checkpoints."""

    def __init__(self, cfg: DistillConfig, teacher, acc, state: dict | None = None):
        self.cfg, self.teacher, self.acc = cfg, teacher, acc
        self.method = create(cfg, teacher)
        self.clip = cfg.clip or self.method.default_clip
        warm = cfg.lr_warmup
        self.lr_warmup = self.method.default_lr_warmup if warm is None else warm
        self.decay_steps = cfg.max_steps if cfg.lr_decay == "cosine" else 0
        self.step0 = self.load(state) if state is not None else 0
        self._prepare()

    @property
    def ema(self):
        """The student's EMA: what is validated and exported."""
        return self.method.ema

    def _parts(self) -> dict:
        """The method's trained networks and optimisers by checkpoint key."""
        return {**self.method.modules(), **self.method.optimisers()}

    def _prepare(self):
        """Wrap the trainable networks and optimisers (DDP on several processes) and hand them to
        the method; load first, as DDP starts every process from rank 0's weights."""
        parts = self._parts()
        with (
            warnings.catch_warnings()
        ):  # torch renamed broadcast_buffers; accelerate passes the old name
            warnings.filterwarnings(
                "ignore", message=".*broadcast_buffers.*", category=FutureWarning
            )
            out = self.acc.prepare(*parts.values())
        self.method.ema.to(self.acc.device)
        self.method.bind(dict(zip(parts, out if len(parts) > 1 else [out])), self.acc)

    def state(self, step: int) -> dict:
        bare = self.acc.unwrap_model
        s = {"step": step, "config": asdict(self.cfg), "ema": network_state(self.method.ema)}
        for key, part in self._parts().items():
            is_net = isinstance(part, torch.nn.Module)
            s[key] = network_state(bare(part)) if is_net else part.state_dict()
        return s

    def load(self, s: dict) -> int:
        load_network_state(self.method.ema, s["ema"])
        for key, part in self._parts().items():
            if isinstance(part, torch.nn.Module):
                load_network_state(part, s[key])
            else:
                part.load_state_dict(s[key])
        return int(s["step"])

    def _apply(self, update: Update, n: int, step: int) -> dict:
        """One optimiser step over ``n`` micro-batches (gradients averaged across processes once, at
        the last), ``update.frozen`` out of autograd throughout; returns the mean logs."""
        from ..core.freeze import frozen

        opt = update.optimiser
        with frozen(*update.frozen):
            opt.zero_grad(set_to_none=True)
            logs = self._accumulate(update, n)
            clipped = update.modules if update.clipped is None else update.clipped
            self.acc.clip_grad_norm_([p for m in clipped for p in m.parameters()], self.clip)
            self._schedule(opt, step)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return logs

    def _schedule(self, opt, step: int) -> None:
        """Each group's rate ramped linearly over the first ``lr_warmup`` steps, then (``lr_decay``
        cosine) falling to 0 at ``max_steps``; set from the step alone, so a resumed run repeats it
        exactly."""
        ramp = min(1.0, (step + 1) / self.lr_warmup) if self.lr_warmup else 1.0
        if self.decay_steps:
            ramp *= cosine_decay(step, 0, self.decay_steps)
        for group in opt.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * ramp

    def _accumulate(self, update: Update, n: int) -> dict:
        """The gradients of the mean loss over ``n`` micro-batches, synchronised across processes
        only at the last."""
        logs: dict = {}
        for j in range(n):
            with contextlib.ExitStack() as stack:
                if j < n - 1:
                    for m in update.modules:
                        stack.enter_context(self.acc.no_sync(m))
                with self.acc.autocast():
                    loss, lg = update.loss(j)
                self.acc.backward(loss / n)
            for k, v in lg.items():
                logs[k] = logs.get(k, 0.0) + v / n
        return logs

    def step(self, step: int, get) -> dict:
        """One training step: ``grad_accum`` micro-batches per process, the method's updates, then
        the EMA. Micro-batch ``part`` = j x processes + rank has its own data slice and generator,
        so one process with accumulation 2 and two processes without take the same step."""
        n, world = self.cfg.grad_accum, self.acc.num_processes
        batch = [get(step, j * world + self.acc.process_index) for j in range(n)]
        logs: dict = {}
        for update in self.method.updates(batch, step):
            logs.update(self._apply(update, n, step))
        student = self.acc.unwrap_model(self.method.student)
        with torch.no_grad():  # a LoRA student's frozen base is the EMA's already
            for pe, ps in zip(self.method.ema.parameters(), student.parameters()):
                if ps.requires_grad:
                    pe.lerp_(ps.detach(), 1 - self.cfg.ema)
        if world > 1:  # the step's mean over every process's micro-batches
            keys = sorted(logs)
            mean = self.acc.reduce(
                torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self.acc.device),
                "mean",
            )
            logs = dict(zip(keys, mean.tolist()))
        return logs


def effective_batch(batch: int, processes: int, grad_accum: int) -> str:
    return (
        f"{batch * processes * grad_accum} (batch {batch} x {processes} "
        f"process{'es' * (processes > 1)} x accumulation {grad_accum})"
    )


def _check_resume(cfg: DistillConfig, state: dict, processes: int, ckpt: str) -> None:
    """Settings that shape the run must match the checkpoint's; the effective batch must too,
    however it is split between processes and accumulation."""
    old = state["config"]
    for k in filter(cfg.shapes, DistillConfig.FIXED):
        was = old.get(k, DistillConfig.FIXED_BEFORE.get(k))
        if was != getattr(cfg, k):
            raise ValueError(
                f"{ckpt} was trained with {k}={was!r}, not {getattr(cfg, k)!r}; resume with "
                "the same setting"
            )
    method_class(cfg).check_resume(cfg, old, ckpt)
    was = (old["batch"], state.get("processes", 1), old["grad_accum"])
    if was[0] * was[1] * was[2] != cfg.batch * processes * cfg.grad_accum:
        raise ValueError(
            f"{ckpt} was trained with an effective batch of {effective_batch(*was)}, but this "
            f"run has {effective_batch(cfg.batch, processes, cfg.grad_accum)}; resume with the "
            f"same effective batch (change --batch or --grad-accum to match)"
        )


def check_out(out: str, overwrite: bool) -> None:
    """The run folder checked before any work: a folder (or a new path) the system takes; a new run
    finds none of a run's files there unless ``overwrite``; a student folder that is not a model
    folder is never written into."""
    from ..files import check_link, check_path, is_model_folder

    # the deepest path a run writes: the student's export, aside and in place
    check_path(
        os.path.join(out, "student.tmp", "text_encoder_2", "model.safetensors.index.json"), "--out"
    )
    check_link(out, "--out")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file; give a folder for the run")
    student = os.path.join(out, "student")
    if os.path.isdir(student) and os.listdir(student) and not is_model_folder(student):
        raise ValueError(
            f"{student!r} holds files and is not a model folder; the student is written there: "
            f"move them or choose another --out"
        )
    found = [name for name in RUN_FILES if os.path.lexists(os.path.join(out, name))]
    if found and not overwrite:
        raise ValueError(
            f"{os.path.join(out, found[0])!r} exists (a previous run's); pass --resume to continue "
            f"that run, --overwrite to replace its files, or choose another --out"
        )


def _tidy(out: str, step: int) -> None:
    """Before resuming at ``step``: remove temporary files a killed save left, and the log lines
    written after the checkpoint (they will be written again)."""
    for name in os.listdir(out):
        if name.startswith(("checkpoint.pt.tmp", "student.tmp", "lora.tmp", ".checkpoint.pt.")):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    for name in ("loss.jsonl", "val.jsonl"):
        trim_log(os.path.join(out, name), step)


def _start(cfg: DistillConfig, overwrite: bool):
    """The accelerator and, when resuming, the checkpoint's state (checked against ``cfg``), with
    the run folder checked and tidied."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from ..parallel import check_world, launched, on_cpu

    cfg.check()
    ckpt = os.path.join(cfg.out, "checkpoint.pt")
    # no buffer broadcast: processes may run different numbers of no-grad forwards (DMD2's backward
    # simulation), and the UNets have no buffers that training changes
    acc = Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=launched() and on_cpu(),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    check_world(acc.num_processes)
    state = None
    if os.path.exists(ckpt):
        if not cfg.resume:
            raise ValueError(f"{ckpt} exists; pass --resume to continue it or choose another --out")
        state = checkpoint.load(ckpt)
        _check_resume(cfg, state, acc.num_processes, ckpt)
    check_out(cfg.out, overwrite or state is not None)  # a resumed run's files are its own
    acc.wait_for_everyone()  # every process has read the checkpoint before the main one tidies
    if acc.is_main_process and os.path.isdir(cfg.out):
        _tidy(cfg.out, state["step"] if state is not None else 0)
    return acc, state


def _teacher(cfg: DistillConfig, acc):
    """The frozen teacher on the accelerator's device."""
    from ..pipelines import GuidedPipeline

    teacher = GuidedPipeline.from_pretrained(cfg.teacher, progress=False, device=acc.device)
    for m in teacher.pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False).eval()
    return teacher


def train(
    cfg: DistillConfig, progress: bool = True, overwrite: bool = False, quiet: bool = False
) -> str:
    """Distil (or resume with ``cfg.resume``); returns the exported student folder
    ``cfg.out/student``.
    A new run into a folder that holds a run's files (config, logs, validation, a student) is
    refused
    unless ``overwrite``, which replaces them by name (``check_out``); a resumed run's files are
    its own.

    Launched on several processes (``torchrun``, ``accelerate launch``) each process trains on its
    own micro-batches and the gradients are averaged: the effective batch is batch x processes x
    grad_accum. Only the main process writes; the others wait for it.

    ``quiet`` (the CLI's): no loading bars or warnings from diffusers and transformers, set once the
    run's checks pass and its first line is out (importing them to say so takes seconds)."""
    acc, state = _start(cfg, overwrite)
    world = acc.num_processes
    # what the run is doing before its first step (loading and building take a while): one line each
    note = _notes(progress and acc.is_main_process, method_class(cfg).name)
    resumed = f" (resuming at step {state['step']})" if state is not None else ""
    note(f"loading teacher {cfg.teacher}{resumed}")
    if quiet:
        from ..pipelines.pipeline import quiet_loading

        quiet_loading()
    teacher = _teacher(cfg, acc)
    if cfg.lora_rank:  # refused before the run folder is made: a run that cannot start leaves none
        check_lora(teacher.family.net, teacher.pipe, teacher.family.component)
    if (
        acc.is_main_process
    ):  # made once the teacher loads: a run that cannot start leaves no empty folder
        os.makedirs(cfg.out, exist_ok=True)
    if cfg.data == "toy":
        note(f"data: the toy world's first {cfg.dataset} scenes, each rendered when a batch asks")
    else:
        note(f"data: reading the images {os.path.join(cfg.data, 'metadata.jsonl')} lists")
    with acc.main_process_first():  # a data folder is read by the main process first
        data = load_data(cfg)
    get = batches(cfg, data, teacher, acc.device, world * cfg.grad_accum)
    note("building the student and its optimisers")
    run = Run(cfg, teacher, acc, state)
    log = None
    if acc.is_main_process:
        write_json(
            os.path.join(cfg.out, "config.json"),
            {
                **asdict(cfg),
                "processes": world,
                "effective_batch": cfg.batch * world * cfg.grad_accum,
            },
        )
        log = open(os.path.join(cfg.out, "loss.jsonl"), "a")
        note(f"effective batch {effective_batch(cfg.batch, world, cfg.grad_accum)}")
    window = dict(state.get("log_window", {})) if state is not None else {}
    step = _loop(cfg, run, get, log, window, progress)
    folder = os.path.join(cfg.out, "student")
    if acc.is_main_process:
        log.close()
        export(run.method, run.ema, folder)
        export_lora(run.method, run.ema, os.path.join(cfg.out, "lora"))
        validate(run.method, run.ema, step)
    acc.wait_for_everyone()
    return folder


def _notes(on: bool, method: str):
    """A function printing ``distill METHOD: text`` on stderr at once (nothing unless ``on``)."""

    def note(text: str) -> None:
        if on:
            print(f"distill {method}: {text}", file=sys.stderr, flush=True)

    return note


def _loop(cfg: DistillConfig, run: Run, get, log, running: dict, progress: bool) -> int:
    """Steps from the run's first to ``cfg.max_steps``, with the logs (``running``: the window since
    the last loss.jsonl line), checkpoints and validations on the way; returns the last step."""
    from tqdm.auto import tqdm

    acc, ckpt, step = run.acc, os.path.join(cfg.out, "checkpoint.pt"), run.step0
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        disable=not progress or not acc.is_main_process,
        desc=f"distill {run.method.name}",
    )
    t0 = time.time()
    while step < cfg.max_steps:
        logs = run.step(step, get)
        step += 1
        for k, v in logs.items():
            running.setdefault(k, []).append(v)
        bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()}, refresh=False)
        bar.update(1)  # the bar shows steps per second and the time left beside the loss
        if acc.is_main_process:
            # a line every log_every steps, each the mean since the last; also step 1 and the run's
            # last step (a short run logs something), which leave the window running, so the
            # regular lines and a resumed run's lines are what they would be without them
            regular = step % cfg.log_every == 0
            if regular or step == 1 or step == cfg.max_steps:
                rec = {
                    "step": step,
                    **{k: float(np.mean(v)) for k, v in running.items()},
                    "seconds": round(time.time() - t0, 2),
                }
                log.write(json.dumps(rec) + "\n")
                log.flush()
                if regular:
                    running = {}
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                checkpoint.save(
                    ckpt, {**run.state(step), "processes": acc.num_processes, "log_window": running}
                )
            if cfg.validate_every and step % cfg.validate_every == 0 and step < cfg.max_steps:
                validate(run.method, run.ema, step)
        if step % cfg.checkpoint_every == 0 or (
            cfg.validate_every and step % cfg.validate_every == 0
        ):
            acc.wait_for_everyone()
    bar.close()
    return step
