"""Samplers for PixArt, shared by inference (the pipeline) and training (loss and validation).

Every sampler has the same diffusers-like interface:

    sampler = build_sampler("dpm")              # set_timesteps(DEFAULT_STEPS["dpm"]) already called
    sampler.set_timesteps(num_inference_steps)  # again, to change the step count / restart
    sampler.set_timesteps(timesteps=[400])      # or custom timesteps (strictly descending)
    latents = init_noise * sampler.init_noise_sigma
    for t in sampler.timesteps:                 # (n,) int64 numpy, visiting order (high -> low)
        model_output = guided_model(latents, t) # (N, C, H, W) ε or (N, 2C, H, W) [ε, learned variance]
        latents = sampler.step(model_output, t, latents)          # or step(..., noise=z) to inject z

Stochastic samplers (DDIM with eta > 0, SA-Solver, IDDPM, LCM) draw their noise from `sampler.generator`
(a numpy Generator; seed it with `seed=` at construction or `sampler.manual_seed(s)`) unless `noise` is
passed. Multistep samplers (DPM-Solver++, SA-Solver) keep state between steps; `set_timesteps` resets it.
"""
from .ddim import DDIMSampler
from .dpm_solver import DPMSolverSampler
from .iddpm import GaussianDiffusion, IDDPMSampler, space_timesteps
from .lcm import LCMSampler
from .sa_solver import SASolverSampler
from .schedule import PerImageNoise, Sampler, make_beta_schedule

SAMPLERS = {
    "dpm": DPMSolverSampler,
    "sa-solver": SASolverSampler,
    "ddim": DDIMSampler,
    "iddpm": IDDPMSampler,
    "lcm": LCMSampler,
}

from pixart.tables import DEFAULT_STEPS  # noqa: E402

assert set(DEFAULT_STEPS) == set(SAMPLERS)

_ALIASES = {
    "dpm-solver": "dpm", "dpm_solver": "dpm", "dpmsolver": "dpm", "dpm++": "dpm",
    "sa_solver": "sa-solver", "sasolver": "sa-solver",
}


def canonical_name(name: str) -> str:
    """'DPM-Solver' -> 'dpm', 'sa_solver' -> 'sa-solver', …; raises ValueError for unknown names."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(SAMPLERS)}")
    return key


def build_sampler(name: str = "dpm", num_inference_steps=None, timesteps=None, **kwargs) -> Sampler:
    """Create a sampler by name and call set_timesteps: the custom ``timesteps`` when given, else
    ``num_inference_steps`` (default: DEFAULT_STEPS[name]).

    kwargs go to the sampler's constructor: schedule (num_train_timesteps, beta_start, beta_end,
    beta_schedule), noise (seed, generator) and sampler options (e.g. eta for "ddim",
    original_inference_steps for "lcm").
    """
    key = canonical_name(name)
    sampler = SAMPLERS[key](**kwargs)
    if timesteps is not None:
        return sampler.set_timesteps(timesteps=timesteps)
    sampler.set_timesteps(num_inference_steps if num_inference_steps is not None else DEFAULT_STEPS[key])
    return sampler


def sampler_for_scheduler_config(config: dict):
    """(sampler name, constructor options) for a diffusers scheduler_config.json whose scheduler is not
    our default DPM-Solver++ (e.g. PixArt-LCM's LCMScheduler -> "lcm"), else (None, {})."""
    if config.get("_class_name") == "LCMScheduler":
        keys = ("original_inference_steps", "timestep_scaling")
        return "lcm", {k: config[k] for k in keys if k in config}
    return None, {}


__all__ = [
    "Sampler", "PerImageNoise", "DPMSolverSampler", "DDIMSampler", "SASolverSampler", "IDDPMSampler", "LCMSampler",
    "GaussianDiffusion", "SAMPLERS", "DEFAULT_STEPS", "build_sampler", "canonical_name",
    "sampler_for_scheduler_config", "make_beta_schedule", "space_timesteps",
]
