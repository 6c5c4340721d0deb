"""The plan of a sweep: every (prompt, target, guidance, best-of-N) combination and the folder its images go to,
and the distinct images those combinations need (`draws`): unguided images do not depend on the target, and
candidate k of best-of-N is the same for every N > k, so each is sampled once and shared."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from rcgdm.sweep.rows import KEY


@dataclass(frozen=True)
class Combo:
    """One (prompt, target, guidance, best-of-N) of a run and the folder its images go to."""

    prompt_index: int
    prompt: str
    target: float
    guidance: float
    best_of: int
    folder: Path

    def key(self) -> tuple:
        """The combination's key, as rows.combo_key gives it for each of its rows."""
        return tuple(getattr(self, field) for field in KEY)


def plan(prompts: list[str], targets: list[float], guidances: list[float], best_ofs: list[int],
         out_dir: str | None = None) -> tuple[Path, list[Combo]]:
    """The run folder and its combinations; a single combination keeps the original's layout (images in the run folder).
    out_dir defaults to imgs/target{target}guidance{guidance}, or imgs/sweep for a sweep."""
    single = len(prompts) == len(targets) == len(guidances) == len(best_ofs) == 1
    root = Path(out_dir or (f"imgs/target{targets[0]}guidance{guidances[0]}" if single else "imgs/sweep"))
    combos = []
    for (k, prompt), target, guidance, best_of in itertools.product(enumerate(prompts), targets, guidances, best_ofs):
        prefix = f"prompt{k}_" if len(prompts) > 1 else ""
        suffix = f"_best{best_of}" if best_ofs != [1] else ""
        folder = root if single else root / f"{prefix}target{target}guidance{guidance}{suffix}"
        combos.append(Combo(k, prompt, target, guidance, best_of, folder))
    return root, combos


@dataclass(frozen=True)
class Draw:
    """Images the combinations `combos` share: one prompt and guidance, and one target unless the guidance is 0.
    Candidates 0 .. candidates - 1 are sampled once each; every combination keeps its best of its first best_of."""

    prompt: str
    target: float
    guidance: float
    combos: tuple[Combo, ...]

    @property
    def candidates(self) -> int:
        return max(combo.best_of for combo in self.combos)


def draws(combos: list[Combo]) -> list[Draw]:
    """The distinct images `combos` need, in the order of the combinations that first need them."""
    groups: dict[tuple, list[Combo]] = {}
    for combo in combos:
        groups.setdefault((combo.prompt, combo.guidance, None if combo.guidance == 0 else combo.target), []).append(combo)
    return [Draw(group[0].prompt, group[0].target, group[0].guidance, tuple(group)) for group in groups.values()]
