"""The paper's simulation, with the answer known: data on a linear subspace, a linear reward, few noisy labels.

x = A z with z ~ N(0, I_d) and A (D x d) orthonormal; r(x) = theta^T x; y = r(x) + N(0, noise_std^2) on
`num_labelled` points, and `num_unlabelled` points without labels. Everything is Gaussian, so p(x | y = a) is known
in closed form (rcgdm/simulation/theory.py). Five samplers at each target a (rcgdm/simulation/experiment.py):

- exact: draws from p(x | y = a);
- fixed: the repository's method (RewardGuidance with a predictor learned on noised labelled points, added to the
  exact unconditional score, stepped by diffusers' DDIM) at strength `fixed_guidance`, the paper's 100;
- posterior: the same at the posterior strength 1 / sigma_t^2, read off the predictor's validation errors;
- posterior_calibrated: a calibrated predictor (told the noise level, predicting Var(y | x_t) beside the mean) guiding
  by its own Gaussian likelihood;
- conditional: the paper's meta-algorithm, a reward model fitted on the labelled points pseudo-labels the
  unlabelled ones and a conditional diffusion model is trained on them, sampled at y = a.

and, at the targets inside the labels' range, particles (rcgdm/sampling/particles.py) over `particle_steps` DDPM steps:
smc_K for K in `particles` (the level-blind predictor at its posterior strength as the proposal, the exact
p(y = a | x0) as the final weight) and smc_calibrated_16 (the calibrated predictor's likelihood throughout).

It checks the paper's claims: (i) the conditional model recovers the subspace (principal angle), (ii) the reward
moves toward the target, (iii) leaving the labels' range costs distance from the subspace.

    python3 simulation.py                       # under a minute on 2 CPU cores
    python3 simulation.py --off_subspace=0.3 --targets=0,2,4,8 --out_dir=sim_off

Writes `out_dir`/summary.json (every measure, per target and sampler), reward_vs_target.png,
off_subspace_vs_target.png, w2_vs_target.png and particles.png. A run never replaces another run's files:
`--overwrite=True` says it may.

    python3 simulation.py --bound=True --out_dir=bound_out   # the paper's bound (rcgdm/simulation/bound.py): minutes

sweeps the labelled points over 50 to 3200 and theta's share off the subspace over 0, 0.1 and 0.3 (`bound_seeds`
worlds each), and writes bound.json and bound.png: the conditional model's and the calibrated posterior's reward
shortfall, W2 and off-subspace fraction, with error bars, and the slope of the shortfall against n.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from rcgdm.cli import MAX_SEED, UserError, run_main, writable_dir
from rcgdm.config import read
from rcgdm.files import run_folder
from rcgdm.files.atomic import remove_leftovers, save_json
from rcgdm.files.locking import LOCK_FILE, locked
from rcgdm.sampling.particles import MAX_PARTICLES
from rcgdm.simulation.bound import MEASURES, run_bound
from rcgdm.simulation.experiment import Settings, memory_needed, run
from rcgdm.simulation.figures import BOUND_FIGURE, FIGURES, draw_bound, draw_figures

# ----------------------------------------------------------------------------- config
dim = 64  # D, the ambient dimension
sub_dim = 16  # d, the data's subspace
noise_std = 0.1  # label noise (the paper's)
off_subspace = 0.0  # share of theta's squared norm outside the subspace
num_labelled = 200
num_unlabelled = 20000
held_out = 0.25  # share of the labelled points that measure the predictor's errors (the posterior strength)
targets = "-2,0,1,2,3,4,6"  # the labels' std is about 1: 3 and beyond lie outside their range
num_samples = 2000  # per target and sampler
num_inference_steps = 50
fixed_guidance = 100.0
predictor_epochs = 150
calibrated_epochs = 60  # passes over the pseudo-labelled unlabelled points, in batches of 500
conditional_steps = 3000
particles = "1,4,16,64"  # K of the rows smc_K (rcgdm/sampling/particles.py); "" for none
particle_targets = "range"  # range: the targets inside the labels' range; else some of the targets (exact draws: the floor)
particle_steps = 100  # DDPM steps for the particles (its ancestral step needs more than DDIM's 50)
seed = 0
out_dir = "simulation_out"
overwrite = False
bound = False  # the paper's bound instead: labelled points 50 to 3200, theta's share off the subspace 0, 0.1, 0.3
bound_seeds = 3  # worlds per point of the bound (its error bars)
bound_target = 1.0
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if k.islower() and k[0] != "_" and isinstance(v, (bool, int, float, str))]
RUN, BOUND_RUN = "simulation", "simulation-bound"
OUTPUTS, BOUND_OUTPUTS = ("summary.json", *FIGURES), ("bound.json", BOUND_FIGURE)

MAX_DIM = 4096  # the W2 measure takes a D x D matrix square root per target and sampler
MAX_POINTS = 10**7
MAX_NOISE_STD = 100.0
MAX_TARGET = 1000.0  # the labels' std is about 1
CHECKS = {
    "dim": (lambda c: 2 <= c["dim"] <= MAX_DIM, f"an integer from 2 to {MAX_DIM}"),
    "sub_dim": (lambda c: 1 <= c["sub_dim"] < c["dim"], "an integer from 1 to dim - 1"),
    "noise_std": (lambda c: 0 < c["noise_std"] <= MAX_NOISE_STD, f"a number > 0 and at most {MAX_NOISE_STD:g} (the labels' "
                  "std is about 1)"),
    "off_subspace": (lambda c: 0 <= c["off_subspace"] < 1, "a share in [0, 1)"),
    "num_labelled": (lambda c: 8 <= c["num_labelled"] <= MAX_POINTS, f"an integer from 8 to {MAX_POINTS}"),
    "num_unlabelled": (lambda c: 1 <= c["num_unlabelled"] <= MAX_POINTS, f"an integer from 1 to {MAX_POINTS}"),
    "held_out": (lambda c: 0 < c["held_out"] < 1 and 2 <= round(c["num_labelled"] * c["held_out"]) < c["num_labelled"],
                 "a share in (0, 1) that holds out 2 or more labelled points and keeps one"),
    "num_samples": (lambda c: c["dim"] < c["num_samples"] <= MAX_POINTS,
                    f"an integer > dim (a covariance is fitted to the samples) and at most {MAX_POINTS}"),
    "num_inference_steps": (lambda c: 1 <= c["num_inference_steps"] <= 1000, "an integer from 1 to 1000"),
    "fixed_guidance": (lambda c: 0 <= c["fixed_guidance"] <= 1e30, "a number from 0 to 1e30"),
    "predictor_epochs": (lambda c: 1 <= c["predictor_epochs"] <= MAX_POINTS, f"an integer from 1 to {MAX_POINTS}"),
    "calibrated_epochs": (lambda c: 1 <= c["calibrated_epochs"] <= MAX_POINTS, f"an integer from 1 to {MAX_POINTS}"),
    "conditional_steps": (lambda c: 1 <= c["conditional_steps"] <= MAX_POINTS, f"an integer from 1 to {MAX_POINTS}"),
    "particle_steps": (lambda c: 1 <= c["particle_steps"] <= 1000, "an integer from 1 to 1000"),
    "seed": (lambda c: 0 <= c["seed"] <= MAX_SEED, f"a seed from 0 to {MAX_SEED}"),
    "bound_seeds": (lambda c: 1 <= c["bound_seeds"] <= 100 and c["seed"] + c["bound_seeds"] <= MAX_SEED + 1,
                    "an integer from 1 to 100 (seed + bound_seeds - 1 a seed)"),
    "bound_target": (lambda c: abs(c["bound_target"]) <= MAX_TARGET, f"a number from {-MAX_TARGET:g} to {MAX_TARGET:g}"),
}


def read_config(argv: list[str]) -> dict:
    config = read({k: globals()[k] for k in config_keys}, argv, __doc__)
    for key, (ok, expected) in CHECKS.items():
        if not ok(config):
            raise UserError(f"--{key}={config[key]!r} is out of range; expected {expected}")
    config["targets"] = parse_targets(config["targets"], "targets")
    if config["particle_targets"] != "range":
        config["particle_targets"] = parse_targets(config["particle_targets"], "particle_targets")
    config["particles"] = parse_particles(config["particles"])
    if config["particle_targets"] != "range" and not set(config["particle_targets"]) <= set(config["targets"]):
        raise UserError(f"--particle_targets={','.join(f'{t:g}' for t in config['particle_targets'])} are not all among "
                        f"--targets; expected some of {','.join(f'{t:g}' for t in config['targets'])}")
    check_memory(config)
    if not config["out_dir"].strip():
        raise UserError("--out_dir='' is empty; expected a folder")
    return config


def check_memory(config: dict) -> None:
    """UserError before anything is allocated when the run's arrays (a lower bound) exceed this machine's memory."""
    import psutil

    needed, parts = memory_needed(Settings(**{k: config[k] for k in Settings.__dataclass_fields__}))
    total = psutil.virtual_memory().total
    if needed > total:
        raise UserError(f"--dim={config['dim']} with --num_unlabelled={config['num_unlabelled']} and --num_samples="
                        f"{config['num_samples']} needs at least {needed / 1e9:.3g} GB ({parts}), more than the "
                        f"{total / 1e9:.3g} GB of this machine; expected a smaller dim or fewer points")


def parse_targets(text: str, key: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(abs(v) <= MAX_TARGET for v in values) or len(set(values)) != len(values):
        raise UserError(f"--{key}={text!r} is not a list of distinct numbers from {-MAX_TARGET:g} to {MAX_TARGET:g}; "
                        f"expected e.g. --{key}=0,1,2")
    return values


def parse_particles(text: str) -> tuple[int, ...]:
    """--particles: distinct counts from 1 to MAX_PARTICLES, or "" for none."""
    parts = [part.strip() for part in text.split(",")] if text.strip() else []
    values = tuple(int(part) for part in parts if part.isdigit())
    if len(values) != len(parts) or len(set(values)) != len(values) or not all(1 <= v <= MAX_PARTICLES for v in values):
        raise UserError(f"--particles={text!r} is not a list of distinct counts from 1 to {MAX_PARTICLES}; expected e.g. "
                        "--particles=4,16 or '' for none")
    return values


def main() -> None:
    config = read_config(sys.argv[1:])
    run_name, outputs = (BOUND_RUN, BOUND_OUTPUTS) if config["bound"] else (RUN, OUTPUTS)
    out_dir, what = Path(config["out_dir"]), f"--out_dir {config['out_dir']!r}"
    run_folder.check_out_dir(out_dir, run_name, outputs, what, config["overwrite"])
    writable_dir(out_dir)
    torch.set_num_threads(min(torch.get_num_threads(), 4))  # small matrices: more threads only wait on each other
    settings = Settings(**{k: config[k] for k in Settings.__dataclass_fields__})
    if config["bound"]:
        result = {"config": config, **run_bound(settings, config["bound_seeds"], config["bound_target"])}
    else:
        result = {"config": config, **run(settings)}
    numbers, draw = ("bound.json", draw_bound) if config["bound"] else ("summary.json", draw_figures)
    with locked(out_dir / LOCK_FILE, what):
        run_folder.check_out_dir(out_dir, run_name, outputs, what, config["overwrite"], holding_lock=True)
        remove_leftovers(out_dir)
        staging = run_folder.make_staging(out_dir, run_name)
        try:
            save_json(result, staging / numbers)
            draw(result, staging)
            run_folder.publish(out_dir, run_name, outputs, run_folder.earlier_files(out_dir, run_name, outputs))
        finally:
            run_folder.remove_staging(staging)
    (print_bound if config["bound"] else print_summary)(result, out_dir)


def print_summary(summary: dict, out_dir: Path) -> None:
    labels = summary["labels"]
    print(f"labels span {labels['min']:.2f} to {labels['max']:.2f} (std {labels['std']:.2f})")
    print(f"{'target':>7} {'sampler':>20} {'reward':>8} {'E[r|y=a]':>9} {'std':>6} {'exact':>6} {'off-subsp.':>10} {'W2':>7}")
    for row in summary["rows"]:
        if row["diverged"]:
            print(f"{row['target']:7.2f} {row['sampler']:>20} diverged (NaN, inf or too large)")
            continue
        print(f"{row['target']:7.2f} {row['sampler']:>20} {row['reward_mean']:8.3f} {row['exact_reward']:9.3f} "
              f"{row['reward_std']:6.3f} {row['exact_reward_std']:6.3f} {row['off_subspace']:10.4f} {row['w2']:7.3f}")
    model = summary["conditional_model"]
    print(f"conditional model: largest principal angle to the data's subspace {model['principal_angle_deg']:.2f} degrees, "
          f"{model['off_subspace']:.2%} of its samples' norm off the subspace")
    print(f"wrote {out_dir / 'summary.json'} and the figures {', '.join(FIGURES)}")


def print_bound(bound: dict, out_dir: Path) -> None:
    print(f"at target {bound['target']:g}, over {bound['seeds']} worlds each (mean ± standard error):")
    print(f"{'share off':>9} {'n':>5} {'sampler':>20} {'|shortfall|':>17} {'W2':>15} {'off-subspace':>17}")
    for r in bound["table"]:
        cells = [f"{r[k]:.4f} ± {r[k + '_se'] or 0:.4f}" if r[k] is not None else "diverged" for k in MEASURES]
        print(f"{r['off_subspace_share']:9g} {r['num_labelled']:5d} {r['sampler']:>20} {cells[0]:>17} {cells[1]:>15} "
              f"{cells[2]:>17}")
    print("slope of log |shortfall| against log n: " + ", ".join(
        f"{name} {'n/a' if v is None else f'{v:.2f}'}" for name, v in bound["slopes"].items()))
    print(f"wrote {out_dir / 'bound.json'} and {out_dir / BOUND_FIGURE}")


if __name__ == "__main__":
    run_main(main)
