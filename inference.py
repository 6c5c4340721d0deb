"""Step 3 of the paper: reward-directed sampling from Stable Diffusion, scored and plotted.

At every denoising step, after classifier-free guidance, the noise prediction gets the term
    eps <- eps + sqrt(1 - alpha_bar_t) * guidance * grad_x 1/2 ||target - mu(x_t)||^2
(rcgdm/sampling/guidance.py). Each image is then scored by the ground-truth reward (fake_dataset.py) and by
the predictor on its VAE re-encoding (train.py).

    python3 inference.py --target 1 --guidance 100 --num_images 100
    python3 inference.py --target 2 4 6 8 10 --guidance 0 100 --prompt "a nice photo" "a dog"   # a sweep
    python3 inference.py --target 2 4 6 8 10 --guidance 0 auto   # auto: a strength per target (rcgdm/sweep/auto.py)

--target, --guidance and --prompt take several values: the run covers every combination
(rcgdm/sweep). Image i always starts from the seed (--seed, i), whatever --bs, so columns of a sweep
are comparable, and an image several combinations share (unguided images do not depend on the
target) is sampled once. Writes per combination `{idx}_gt_{gt:.4f}_pred_{pred:.4f}.png`, and for
the run (rcgdm/report.py) results.csv, summary.json, reward_vs_target.png, shift_vs_target.png
(distribution shift: distance of the final latents to the predictor's training latents),
reward_vs_compute.png (reward against UNet calls per image, for best-of-N), reward_vs_distance.png (reward against
MMD^2 to the unguided images: what the guidance bought and cost) and grid.png.

    python3 inference.py --target 1 --guidance 100 --scheduler ddpm --particles 8   # particles: rcgdm/sampling/particles.py

--particles K samples each guided image from K particles (twisted SMC, exact as K grows for the likelihood the
guidance steers by), at K times the UNet calls; the report adds their effective share per step (ess_per_step.png).
"""

from __future__ import annotations

import argparse
import secrets
import time
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from rcgdm import distributed
from rcgdm.cli import (
    MAX_SEED,
    ArgumentParser,
    UserError,
    finite_float,
    non_empty,
    positive_int,
    run_main,
    text_problem,
    writable_dir,
)
from rcgdm.files import run_folder
from rcgdm.files.atomic import remove_leftovers
from rcgdm.files.locking import LOCK_FILE, refuse_if_locked
from rcgdm.files.output_checks import refuse_nested_runs
from rcgdm.files.provenance import package_versions, sha256_file
from rcgdm.models import SD15, local_model_folder, model_facts, model_fingerprint
from rcgdm.pipeline import RewardDirectedPipeline
from rcgdm.pipeline_checks import check_memory
from rcgdm.report import write_report
from rcgdm.sampling.families import FAMILIES, Family
from rcgdm.sampling.guidance import GRAD_PATHS
from rcgdm.sampling.particles import MAX_PARTICLES
from rcgdm.sampling.posterior import POSTERIOR
from rcgdm.sampling.schedulers import SCHEDULERS, check_particle_scheduler, scheduler_support
from rcgdm.sweep.auto import AUTO
from rcgdm.sweep.engine import SweepSettings, check_images_visible, run_sweep, unguided_first_images
from rcgdm.sweep.outputs import RUN, check_outputs, finish, prepare_folders, run_dir
from rcgdm.sweep.plan import Combo, plan
from rcgdm.sweep.resume import ResumeLog

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", type=finite_float, nargs="+", default=[0.0], help="target reward(s) (default: 0)")
    p.add_argument("--guidance", type=guidance_value, nargs="+", default=[0.0],
                   help="guidance strength(s); auto: the smallest a short pilot finds to reach the target; posterior: "
                        "1 / sigma_t^2 from the predictor's errors at each step (default: 0)")
    p.add_argument("--auto_tolerance", type=finite_float, default=None,
                   help=f"--guidance auto: how close the pilot must come (default: {AUTO_TOLERANCE_STDS:g} x the label std)")
    p.add_argument("--prompt", nargs="+", default=["a nice photo"],
                   help='prompt(s); "" samples unconditionally (default: "a nice photo")')
    p.add_argument("--out_dir", type=non_empty, default=None,
                   help="default: imgs/target{target}guidance{guidance}, or imgs/sweep for a sweep")
    p.add_argument("--num_images", type=positive_int, default=4, help="images per combination (default: 4)")
    p.add_argument("--bs", type=positive_int, default=4, help="images per batch (default: 4)")
    p.add_argument("--seed", type=int, default=-1, help=f"-1: a random seed, recorded; 0 to {MAX_SEED}: fixed (default: -1)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--model", type=non_empty, default=SD15, help=f"hub id, local diffusers folder, or tiny (default: {SD15})")
    p.add_argument("--reward_model", type=non_empty, default="reward_model.pth", help="ground-truth reward from fake_dataset.py")
    p.add_argument("--predictor", type=non_empty, default="convnet.pth", help="reward predictor from train.py")
    p.add_argument("--reward", type=non_empty, default=None,
                   help="module:function: run the user-code reward that --reward_model records (files never run code)")
    p.add_argument("--num_inference_steps", type=positive_int, default=None,
                   help=f"denoising steps (default: the model family's: {family_defaults('steps')})")
    p.add_argument("--cfg", type=finite_float, default=None,
                   help=f"classifier-free guidance scale (default: the model family's: {family_defaults('cfg')})")
    p.add_argument("--scheduler", default=None, help=f"{', '.join(SCHEDULERS)} or their diffusers class names "
                                                     f"(default: the model family's: {family_defaults('scheduler')})")
    p.add_argument("--distilled_guidance", type=finite_float, default=None,
                   help="FLUX.1-dev's guidance embedding, a conditioning value (default: 3.5, its pipeline's); "
                        "refused on models without one")
    p.add_argument("--height", type=positive_int, default=None,
                   help="image height, a multiple of 8; of 16 for SD3 and FLUX (default: the model's)")
    p.add_argument("--width", type=positive_int, default=None,
                   help="image width, a multiple of 8; of 16 for SD3 and FLUX (default: the model's)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--batch_mean_guidance", action="store_true", help="divide the term by the batch size, as the original code")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's images and files in --out_dir")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run in --out_dir (same settings)")
    p.add_argument("--ignore_provenance", action="store_true",
                   help="use a predictor recorded as trained for another reward model or model (otherwise refused)")
    p.add_argument("--grad_path", default="xt", choices=GRAD_PATHS,
                   help="xt: the predictor on the noisy latent (the paper); x0: on the denoised estimate (default: xt)")
    p.add_argument("--best_of", type=positive_int, nargs="+", default=[1],
                   help="N candidates per image, keep the one whose predicted reward is closest to the target (default: 1)")
    p.add_argument("--particles", type=positive_int, default=1,
                   help="K particles per guided image (twisted SMC: rcgdm/sampling/particles.py), needs --scheduler ddpm or "
                        "euler_a (flow models: flow_euler), denoised --bs at a time (default: 1, none)")
    return p.parse_args()


MAX_TARGET = 1e6  # rewards are O(1)-O(100); beyond this a target is a typo, and figures cannot draw it
MAX_SIZE = 4096
MAX_STEPS = 1000  # SD's training timesteps: no scheduler can take more steps than that


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before anything loads."""
    for prompt in args.prompt:
        problem = text_problem(prompt)
        if problem:
            raise UserError(f"--prompt {prompt!a} {problem}; expected a text prompt")
        if prompt and not prompt.strip():
            raise UserError(f"--prompt {prompt!r} is blank; expected some text, or '' for unconditional samples")
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and (value % 8 or value > MAX_SIZE):
            example = min(value - value % 8 or 8, MAX_SIZE)
            raise UserError(f"--{flag} {value} is not a multiple of 8 up to {MAX_SIZE}; expected e.g. {example}")
    if not -1 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed {args.seed} is out of range; expected -1 (random) or a seed from 0 to {MAX_SEED}")
    for target in args.target:
        if abs(target) > MAX_TARGET:
            raise UserError(f"--target {target:g} is out of range; expected a number from {-MAX_TARGET:g} to {MAX_TARGET:g}")
    if args.num_inference_steps is not None and args.num_inference_steps > MAX_STEPS:
        raise UserError(f"--num_inference_steps {args.num_inference_steps} is more than the {MAX_STEPS} training timesteps; "
                        f"expected 1 to {MAX_STEPS}")
    check_particles(args)
    if args.auto_tolerance is not None and args.auto_tolerance <= 0:
        raise UserError(f"--auto_tolerance {args.auto_tolerance:g} is not positive; expected a number > 0")
    for flag, normalise in (("prompt", lambda p: " ".join(p.split())), ("target", float), ("guidance", str), ("best_of", int)):
        values = [normalise(v) for v in getattr(args, flag)]
        repeated = next((v for k, v in enumerate(values) if v in values[:k]), None)
        if repeated is not None:
            raise UserError(f"--{flag} has {repeated!r} twice; expected distinct values (a sweep samples each once)")


def check_particles(args: argparse.Namespace) -> None:
    """--particles: at most MAX_PARTICLES, and not with what it cannot combine with (the scheduler is checked once the
    model's family has filled it)."""
    if args.particles > MAX_PARTICLES:
        raise UserError(f"--particles {args.particles} is more than {MAX_PARTICLES}; expected 1 to {MAX_PARTICLES}")
    if args.particles > 1 and AUTO in args.guidance:
        raise UserError("--particles with --guidance auto: auto's pilots search a strength for the plain sampler; expected "
                        "a number or posterior")
    if args.particles > 1 and args.batch_mean_guidance:
        raise UserError("--particles with --batch_mean_guidance: the original code's batch-mean strength depends on the "
                        "batch, and particles change it; expected one of the two")


def particles_used(args: argparse.Namespace) -> int:
    """--particles, or 1 for a run with no guided combination (unguided images never use particles)."""
    return args.particles if any(g != 0 for g in args.guidance) else 1


AUTO_TOLERANCE_STDS = 0.1  # --guidance auto's default tolerance, in label std (the predictor records it)


def guidance_value(text: str) -> float | str:
    """argparse type: a finite strength, "auto" or "posterior"."""
    word = text.strip().lower()
    return word if word in (AUTO, POSTERIOR) else finite_float(text)


def auto_tolerance(args: argparse.Namespace, predictor_meta: dict) -> float:
    """--auto_tolerance, or AUTO_TOLERANCE_STDS label std of the predictor's training labels."""
    if args.auto_tolerance is not None or AUTO not in args.guidance:
        return args.auto_tolerance or 0.0
    label_std = predictor_meta.get("label_std")
    if not isinstance(label_std, int | float) or not label_std > 0:
        raise UserError(f"--guidance auto: --predictor {args.predictor!r} records no label std; expected --auto_tolerance")
    return AUTO_TOLERANCE_STDS * label_std


def family_defaults(setting: str) -> str:
    """A setting's default per model family, for --help: "50 (SD 1.x/2.x), 50 (SDXL), 28 (SD3)"."""
    return ", ".join(f"{getattr(family, setting):g} ({family.label})" if setting == "cfg" else
                     f"{getattr(family, setting)} ({family.label})" for family in FAMILIES.values())


def fill_family_defaults(args: argparse.Namespace, family: Family) -> None:
    """Steps, cfg, scheduler and distilled guidance left open take the model family's own (rcgdm/sampling/families.py)."""
    args.num_inference_steps, args.cfg, args.scheduler = family.fill(args.num_inference_steps, args.cfg, args.scheduler)
    if args.distilled_guidance is None:
        args.distilled_guidance = family.distilled_guidance


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name == "fp16" and device.type != "cuda":
        raise UserError(f"--dtype fp16 on {device.type} is not supported; expected fp32 or bf16 there")
    return DTYPES[name]


def image_settings(args: argparse.Namespace, seed: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Everything that shapes the images: a resumed run must match it. With --guidance auto that includes the device
    and dtype, which move the pilots' numbers and so the strengths the search would choose."""
    keys = ("prompt", "target", "guidance", "num_images", "bs", "seed", "model", "reward_model", "predictor",
            "num_inference_steps", "cfg", "distilled_guidance", "scheduler", "height", "width", "dtype", "batch_mean_guidance",
            "grad_path", "best_of", "auto_tolerance", "particles")
    contents = {  # what the files hold, not only their paths: a retrained predictor at the same path is another run
        "reward_model_sha256": sha256_file(args.reward_model),
        "predictor_sha256": sha256_file(args.predictor),
        "model_fingerprint": model_fingerprint(args.model),
    }
    search = f"{device.type}/{str(dtype).removeprefix('torch.')}" if AUTO in args.guidance else None
    return {**{key: getattr(args, key) for key in keys}, **contents, "auto_search_on": search, "seed_used": seed}


def main() -> None:
    args = parse_args()
    check_args(args)
    start = time.perf_counter()
    state, device = distributed.start(args.device)
    dtype = resolve_dtype(args.dtype, device)
    out_dir, combos = plan(args.prompt, args.target, args.guidance, args.best_of, args.out_dir)
    if args.scheduler is not None:
        scheduler_support(args.scheduler)  # an unknown or unsupported scheduler fails before anything loads
    what, lock = f"--out_dir {str(out_dir)!r}", out_dir / LOCK_FILE
    inputs = {"--reward_model": args.reward_model, "--predictor": args.predictor}
    if state.is_main_process:  # only the main process ever locks: other processes probing too would race with it
        refuse_if_locked(lock, what)  # a running sweep's files are not an earlier run's
        refuse_nested_runs(out_dir, "--out_dir")
        run_folder.recover(out_dir, RUN, lock, what)  # a publish cut short by a kill is finished first
    check_outputs(out_dir, combos, inputs, local_model_folder(args.model), args.resume, args.overwrite)
    with state.main_process_first():  # hub downloads happen once
        facts = model_facts(args.model)  # configs only; the family fills the settings left open
    fill_family_defaults(args, FAMILIES[facts["family"]])
    if particles_used(args) > 1:
        check_particle_scheduler(args.scheduler)  # the family's default, if none was asked for
    pipe = load(args, facts, state, device, dtype)  # every input is checked before any output folder exists
    if POSTERIOR in args.guidance:
        pipe.predictor.posterior_strength()  # the paper's predictor must have recorded its error curve
    tolerance = auto_tolerance(args, pipe.predictor.meta)
    writable_dir(out_dir)
    with distributed.main_only_lock(state, lock, what):
        if state.is_main_process:  # again, holding the lock: another run may have written meanwhile
            refuse_nested_runs(out_dir, "--out_dir")
            check_outputs(out_dir, combos, inputs, local_model_folder(args.model), args.resume, args.overwrite)
        log = open_log(args, state, out_dir, combos, device, dtype)
        folder = log.path.parent  # out_dir, or the staging folder of a run that replaces an earlier one
        staged = [replace(combo, folder=folder / combo.folder.relative_to(out_dir)) for combo in combos]
        with state.main_process_first():  # folders are readied before anyone writes
            if state.is_main_process:
                prepare_folders(folder, staged, log)
                for path in {folder, *(combo.folder for combo in staged)}:
                    remove_leftovers(path)  # temporary files of a killed run
        settings = SweepSettings(args.num_images, args.bs, args.num_inference_steps, args.cfg, args.height, args.width,
                                 args.batch_mean_guidance, args.grad_path, tolerance, args.distilled_guidance, args.particles)
        rows, stats = run_sweep(pipe, settings, staged, folder, log, state)
        if state.is_main_process:
            check_images_visible(folder, rows)
            record = {"settings": {**vars(args), "seed_used": log.seed, "out_dir": str(out_dir)},
                      "reward_model": pipe.reward_meta, "predictor": pipe.predictor.meta, "processes": state.num_processes,
                      "seconds": time.perf_counter() - start, "versions": package_versions()}
            _, written = write_report(folder, combos, rows, stats, record, unguided_first_images(pipe, settings, combos,
                                                                                                  log.seed))
            log.remove_files()
            finish(out_dir, folder, combos, [*written, *(row["file"] for row in rows)])
        state.print(f"wrote {len(rows)} images and {out_dir / 'results.csv'}, summary.json, the figures and grid.png")
    distributed.finish(state)


def load(args: argparse.Namespace, facts: dict, state: PartialState, device: torch.device,
         dtype: torch.dtype) -> RewardDirectedPipeline:
    """The pipeline with --scheduler, the predictor and the ground-truth reward, on `device`. What configs (`facts`:
    rcgdm.models.model_facts) and checkpoints can tell is checked before the pipeline's weights load."""
    with state.main_process_first():  # hub downloads happen once
        pipe = RewardDirectedPipeline.from_pretrained(
            args.model, args.predictor, args.reward_model, user_reward=args.reward, scheduler=args.scheduler, device=device,
            dtype=dtype, ignore_provenance=args.ignore_provenance, grad_path=args.grad_path, height=args.height,
            width=args.width, facts=facts,
        )
    particles = particles_used(args)
    pipe.check(args.num_inference_steps, args.grad_path, args.height, args.width, args.distilled_guidance, particles)
    check_memory(args.num_images, args.bs, max(args.best_of), *pipe.image_size(args.height, args.width), device, particles)
    return pipe


def open_log(args: argparse.Namespace, state: PartialState, out_dir: Path, combos: list[Combo], device: torch.device,
             dtype: torch.dtype) -> ResumeLog:
    """The main process starts (or resumes) the run; every process gets its settings (the seed), the rows already
    done and the folder the run writes to (out_dir, or its staging folder: rcgdm/sweep/outputs.py)."""
    shared = [None]
    if state.is_main_process:
        seed = args.seed if args.seed >= 0 else secrets.randbelow(2**31)
        where = run_dir(out_dir, combos, args.resume, args.overwrite)
        log = ResumeLog.open(where, image_settings(args, seed, device, dtype), args.resume, args.overwrite)
        if log.rows:
            print(f"--resume: {len(log.rows)} images already done in {out_dir}")
        elif args.seed < 0:
            print(f"--seed -1: using the random seed {log.seed} (recorded in summary.json)")
        shared = [(log.settings, log.rows, str(where), log.auto)]
    settings, rows, where, auto = broadcast_object_list(shared)[0]
    return ResumeLog(Path(where), settings, rows, state.process_index, auto)


if __name__ == "__main__":
    run_main(main)
