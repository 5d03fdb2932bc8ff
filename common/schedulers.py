"""Samplers by name, checked against the model's flavour (discrete DDPM or EDM)."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.cli import UserError
from common.models import is_edm_scheduler_config


@dataclass(frozen=True)
class SchedulerChoice:
    class_name: str
    edm: bool
    webui_sampler: str  # the name WebUI writes in a PNG's parameters
    webui_schedule: str = ""
    overrides: dict = field(default_factory=dict)
    default_eta: float = 0.0


SCHEDULERS: dict[str, SchedulerChoice] = {
    "euler": SchedulerChoice("EulerDiscreteScheduler", False, "Euler"),
    "euler-a": SchedulerChoice("EulerAncestralDiscreteScheduler", False, "Euler a"),
    "dpmpp-2m": SchedulerChoice(
        "DPMSolverMultistepScheduler",
        False,
        "DPM++ 2M",
        overrides={"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpmpp-2m-karras": SchedulerChoice(
        "DPMSolverMultistepScheduler",
        False,
        "DPM++ 2M",
        "Karras",
        overrides={"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "edm-euler": SchedulerChoice("EDMEulerScheduler", True, "Euler", "Karras"),
    "edm-dpmpp-2m": SchedulerChoice(
        "EDMDPMSolverMultistepScheduler",
        True,
        "DPM++ 2M",
        "Karras",
        overrides={"algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    # TCD's gamma (the pipeline's eta) 0.3 is the value its authors recommend for few steps.
    "tcd": SchedulerChoice("TCDScheduler", False, "TCD", default_eta=0.3),
    "lcm": SchedulerChoice("LCMScheduler", False, "LCM"),
}
SCHEDULER_NAMES = ("default", *SCHEDULERS)


def scheduler_name_of(scheduler) -> str:
    """Our name for a scheduler instance, or its class name when it has none here."""
    class_name = type(scheduler).__name__
    config = scheduler.config
    for name, choice in SCHEDULERS.items():
        if choice.class_name == class_name and all(config.get(k) == v for k, v in choice.overrides.items()):
            return name
    return class_name


def check_scheduler_name(name: str) -> str:
    if name not in SCHEDULER_NAMES:
        raise UserError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    return name


def counterpart_sampler(class_name: str, edm: bool) -> str:
    """Our sampler of kind `edm` closest to a scheduler class of the other kind (DPM++ 2M for DPM-Solver,
    Euler otherwise; the discrete DPM++ 2M on Karras sigmas, as EDM schedulers space theirs)."""
    dpm = "DPMSolver" in class_name
    if edm:
        return "edm-dpmpp-2m" if dpm else "edm-euler"
    return "dpmpp-2m-karras" if dpm else "euler"


def make_scheduler(name: str, model_scheduler, *, model_is_edm: bool | None = None):
    """Scheduler `name` configured from the model's own scheduler (its betas or its sigma range).

    Discrete schedulers step through the DDPM timestep table the UNet was trained on; EDM
    schedulers feed it the preconditioned input c_in(sigma)*x and c_noise = ln(sigma)/4 (Karras
    et al. 2022, Table 1). Each is meaningless on a model of the other kind, so a mismatch is refused.
    `model_is_edm` is the model's kind as decided (`decide_base_formulation`; read from the config when
    None). When the model's own scheduler is of the other kind (an EDM sampler saved with a discrete
    model's betas), "default" is its counterpart of the model's kind.
    """
    import diffusers

    check_scheduler_name(name)
    if model_is_edm is None:
        model_is_edm = is_edm_scheduler_config(model_scheduler.config)
    own_class = type(model_scheduler).__name__
    if name == "default":
        if own_class.startswith("EDM") == model_is_edm:
            return model_scheduler
        name = counterpart_sampler(own_class, model_is_edm)
    choice = SCHEDULERS[name]
    if choice.edm != model_is_edm:
        model_kind = "an EDM model (continuous sigma, EDM preconditioning)" if model_is_edm else (
            "a discrete DDPM model (trained on 1000 timesteps)"
        )
        fitting = [n for n, c in SCHEDULERS.items() if c.edm == model_is_edm]
        raise UserError(
            f"scheduler {name!r} is {'an EDM' if choice.edm else 'a discrete'} sampler, but this is {model_kind}; "
            f"use default or one of {', '.join(fitting)}"
        )
    scheduler_class = getattr(diffusers, choice.class_name)
    return scheduler_class.from_config(model_scheduler.config, **choice.overrides)
