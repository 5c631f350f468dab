"""The scheduler config keys diffguide reads, class by class, and the values it reproduces.

``CLASSES`` lists, for every diffusers scheduler class diffguide maps, the keys it reads; ``HOW``
says how each is read (docs/models.md prints the table). ``review(name, config)`` returns one
'key=value (why)' for every key set to a value diffguide does not reproduce, and for every key
outside the table that is not at its class's default, so that a folder never changes diffusers'
images silently: the pipeline says them in one notice (or refuses with ``strict_config=True``).
Invalid values (an unknown beta_schedule or prediction_type) are errors where they are read.
"""

from __future__ import annotations

import inspect
import math

TABLE = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
)
ZERO_SNR = ("rescale_betas_zero_snr",)
SPACED = ("timestep_spacing", "steps_offset")
CLIP = ("clip_sample", "clip_sample_range")
THRESHOLD = ("thresholding", "dynamic_thresholding_ratio", "sample_max_value")
SIGMAS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
FLOW_SIGMAS = ("use_flow_sigmas", "flow_shift")
DYNAMIC = ("use_dynamic_shifting", "time_shift_type")
ORDER = ("solver_order", "lower_order_final")
DPM = (
    TABLE
    + THRESHOLD
    + SIGMAS
    + FLOW_SIGMAS
    + DYNAMIC
    + ORDER
    + ("algorithm_type", "solver_type", "final_sigmas_type", "lambda_min_clipped", "variance_type")
)
FLOW_MATCH = (
    "num_train_timesteps",
    "shift",
    "use_dynamic_shifting",
    "base_shift",
    "max_shift",
    "base_image_seq_len",
    "max_image_seq_len",
    "invert_sigmas",
    "shift_terminal",
    "time_shift_type",
    "stochastic_sampling",
) + SIGMAS
EDM = (
    "sigma_min",
    "sigma_max",
    "sigma_data",
    "sigma_schedule",
    "num_train_timesteps",
    "prediction_type",
    "rho",
    "final_sigmas_type",
)
LCM = (
    TABLE
    + ZERO_SNR
    + SPACED
    + CLIP
    + THRESHOLD
    + ("original_inference_steps", "set_alpha_to_one", "timestep_scaling")
)
DDIM = TABLE + ZERO_SNR + SPACED + CLIP + THRESHOLD + ("set_alpha_to_one",)
DDPM = TABLE + ZERO_SNR + SPACED + CLIP + THRESHOLD + ("variance_type",)
COGVIDEOX = (
    TABLE + ZERO_SNR + SPACED + CLIP + ("set_alpha_to_one", "sample_max_value", "snr_shift_scale")
)
K_DIFFUSION = TABLE + SPACED + SIGMAS

CLASSES = {
    "DDIMScheduler": DDIM,
    "DDIMParallelScheduler": DDIM,
    "DDPMScheduler": DDPM,
    "DDPMParallelScheduler": DDPM,
    "PNDMScheduler": TABLE + SPACED + ("skip_prk_steps", "set_alpha_to_one"),
    "LCMScheduler": LCM,
    "TCDScheduler": LCM,
    "CogVideoXDDIMScheduler": COGVIDEOX,
    "CogVideoXDPMScheduler": COGVIDEOX,
    "DPMSolverMultistepScheduler": DPM + ZERO_SNR + SPACED + ("euler_at_final", "use_lu_lambdas"),
    "DPMSolverSinglestepScheduler": DPM,
    "UniPCMultistepScheduler": TABLE
    + ZERO_SNR
    + SPACED
    + THRESHOLD
    + SIGMAS
    + FLOW_SIGMAS
    + DYNAMIC
    + ORDER
    + (
        "predict_x0",
        "solver_type",
        "disable_corrector",
        "solver_p",
        "final_sigmas_type",
        "sigma_min",
        "sigma_max",
        "shift_terminal",
    ),
    "DEISMultistepScheduler": TABLE
    + SPACED
    + THRESHOLD
    + SIGMAS
    + FLOW_SIGMAS
    + DYNAMIC
    + ORDER
    + ("algorithm_type", "solver_type"),
    "SASolverScheduler": TABLE
    + SPACED
    + THRESHOLD
    + SIGMAS
    + FLOW_SIGMAS
    + (
        "predictor_order",
        "corrector_order",
        "tau_func",
        "algorithm_type",
        "lower_order_final",
        "lambda_min_clipped",
        "variance_type",
    ),
    "DPMSolverSDEScheduler": K_DIFFUSION
    + ("noise_sampler_seed",),  # a dummy class without torchsde: listed by hand
    "EulerDiscreteScheduler": K_DIFFUSION
    + ZERO_SNR
    + ("interpolation_type", "sigma_min", "sigma_max", "timestep_type", "final_sigmas_type"),
    "EulerAncestralDiscreteScheduler": TABLE + ZERO_SNR + SPACED,
    "HeunDiscreteScheduler": K_DIFFUSION + CLIP,
    "LMSDiscreteScheduler": K_DIFFUSION,
    "KDPM2DiscreteScheduler": K_DIFFUSION,
    "KDPM2AncestralDiscreteScheduler": K_DIFFUSION,
    "FlowMatchEulerDiscreteScheduler": FLOW_MATCH,
    "FlowMatchHeunDiscreteScheduler": ("num_train_timesteps", "shift"),
    "SCMScheduler": ("num_train_timesteps", "prediction_type", "sigma_data"),
    "EDMEulerScheduler": EDM,
    "EDMDPMSolverMultistepScheduler": EDM
    + THRESHOLD
    + ORDER
    + ("algorithm_type", "solver_type", "euler_at_final"),
}

HOW = {
    "num_train_timesteps": "length of the training table (VP) or of the flow's training grid",
    "beta_start": "the alpha_bar table, as diffusers builds it in float32",
    "beta_end": "the alpha_bar table",
    "beta_schedule": "the alpha_bar table (linear, scaled_linear, squaredcos_cap_v2)",
    "trained_betas": "the alpha_bar table",
    "prediction_type": "the kind the network's output is converted from",
    "rescale_betas_zero_snr": "zero terminal SNR (Lin et al. 2023); Euler, DPM-Solver and UniPC "
    "put 2^-24 for the last alpha_bar as diffusers does",
    "timestep_spacing": "the grid (linspace, leading, trailing); DDIM and PNDM land each update at "
    "t - T // n as diffusers does",
    "steps_offset": "added to a leading grid",
    "clip_sample": "x0 clipped (Clip); DDIM renoises with the network's eps",
    "clip_sample_range": "the clip bound",
    "thresholding": "dynamic thresholding of x0",
    "dynamic_thresholding_ratio": "its quantile",
    "sample_max_value": "its largest bound",
    "use_karras_sigmas": "a Karras grid, with the integer times diffusers shows the network",
    "use_exponential_sigmas": "an exponential grid, with diffusers' network times",
    "use_beta_sigmas": "a Beta(0.6, 0.6) grid, with diffusers' network times",
    "use_flow_sigmas": "DPM-Solver on a rectified flow (Sana)",
    "flow_shift": "the flow's shift",
    "use_dynamic_shifting": "resolution-dependent shift from the latent's token count "
    "(flow-matching schedulers)",
    "time_shift_type": "exponential or linear dynamic shift",
    "solver_order": "the sampler's order",
    "lower_order_final": "the sampler option of that name",
    "algorithm_type": "which sampler reproduces the step rule",
    "solver_type": "the sampler option of that name (midpoint, heun; bh1, bh2)",
    "final_sigmas_type": "the grid ends at sigma_min or at the data",
    "lambda_min_clipped": "read; only -inf is reproduced",
    "variance_type": "learned variance channels dropped (DPM-Solver); DDPM's fixed_small(_log) "
    "posterior",
    "euler_at_final": "the sampler option of that name",
    "use_lu_lambdas": "a grid uniform in logSNR with rounded times",
    "predict_x0": "UniPC in data prediction (only True is reproduced)",
    "disable_corrector": "UniPC's option",
    "solver_p": "read; only None is reproduced",
    "sigma_min": "the grid's lowest level",
    "sigma_max": "the grid's highest level",
    "shift_terminal": "the flow grid stretched to end at this level",
    "skip_prk_steps": "PLMS (True) or PNDM's Runge-Kutta start (not reproduced)",
    "set_alpha_to_one": "where the last update lands (data, or alpha_bar[0])",
    "original_inference_steps": "LCM's distillation grid",
    "timestep_scaling": "LCM's boundary condition",
    "snr_shift_scale": "CogVideoX's SNR shift of the alpha_bar table",
    "shift": "the flow's static shift",
    "base_shift": "dynamic shift at base_image_seq_len",
    "max_shift": "dynamic shift at max_image_seq_len",
    "base_image_seq_len": "dynamic shift's first token count",
    "max_image_seq_len": "dynamic shift's second token count",
    "invert_sigmas": "read; only False is reproduced (Mochi's inverted grid)",
    "stochastic_sampling": "the consistency sampler (x0 renoised with fresh noise)",
    "sigma_data": "EDM's / TrigFlow's data scale",
    "sigma_schedule": "EDM's Karras or exponential grid",
    "rho": "Karras' rho",
    "interpolation_type": "sigma between table entries (only linear is reproduced)",
    "timestep_type": "continuous: the network sees ln(sigma) / 4 (with v-prediction, as diffusers)",
    "noise_sampler_seed": "read; the Brownian tree is diffguide's own (see the sampler notice)",
    "predictor_order": "SA-Solver (no diffguide sampler yet)",
    "corrector_order": "SA-Solver",
    "tau_func": "SA-Solver",
}


def _limits(name: str, cfg: dict) -> list[tuple[str, str]]:
    """(key, why) for each key of the table set to a value diffguide does not reproduce."""
    out = []

    def no(key, why):
        out.append((key, why))

    if cfg.get("invert_sigmas"):
        no("invert_sigmas", "Mochi's inverted flow grid is not supported")
    if (
        cfg.get("lambda_min_clipped", -math.inf) not in (None, -math.inf)
        and name != "SASolverScheduler"
    ):
        no("lambda_min_clipped", "the clipped grid top is not reproduced")
    if name in (
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "UniPCMultistepScheduler",
        "DEISMultistepScheduler",
    ) and cfg.get("use_dynamic_shifting"):
        no("use_dynamic_shifting", "a dynamic shift on a multistep scheduler is not reproduced")
    if name == "UniPCMultistepScheduler":
        for key in ("sigma_min", "sigma_max", "shift_terminal"):
            if cfg.get(key) is not None:
                no(key, "UniPC's own grid bounds are not reproduced")
    if name == "EulerDiscreteScheduler":
        if cfg.get("interpolation_type", "linear") != "linear":
            no("interpolation_type", "only linear interpolation of sigma is reproduced")
        if cfg.get("final_sigmas_type", "zero") != "zero":
            no("final_sigmas_type", "Euler's zero-length last step to sigma_min is not reproduced")
    if name in _EDM_NAMES and cfg.get("final_sigmas_type", "zero") != "zero":
        no("final_sigmas_type", "EDM's zero-length last step to sigma_min is not reproduced")
    if name == "DEISMultistepScheduler" and cfg.get("solver_type", "logrho") != "logrho":
        no("solver_type", "only logrho is reproduced")
    return out


_EDM_NAMES = {"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"}


_NOT_TAKEN = object()


def _default(cls, key):
    """The diffusers class's own default for key: inspect.Parameter.empty when unknown (no class,
    or a signature of *args), _NOT_TAKEN when the class takes no such argument."""
    if cls is None:
        return inspect.Parameter.empty
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return inspect.Parameter.empty
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return params[key].default if key in params else inspect.Parameter.empty
    return params[key].default if key in params else _NOT_TAKEN


def review(name: str, cfg: dict, cls=None) -> list[str]:
    """'key=value (why)' for every config key diffguide does not reproduce (see the module
    docstring).
    ``cls``: the diffusers class. A key outside the table is said unless it keeps the class's
    default;
    a key the class does not take (folders carry other classes' keys: SDXL's Euler config has
    skip_prk_steps) changes nothing in diffusers either and is passed over."""
    known = CLASSES.get(name)
    if known is None:
        return []  # an unmapped class is refused or noticed where it is read
    found = [f"{k}={cfg.get(k)!r} ({why})" for k, why in _limits(name, cfg)]
    for key in sorted(set(cfg) - set(known)):
        default = _default(cls, key)
        if key.startswith("_") or (cls is not None and default is _NOT_TAKEN):
            continue
        if default is inspect.Parameter.empty or cfg[key] != default:
            found.append(f"{key}={cfg[key]!r} (not read by diffguide)")
    return found
