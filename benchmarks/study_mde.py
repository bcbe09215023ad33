"""The minimum detectable difference a finished study actually has, from its committed results.

The pilot sizes a study with an assumed seed spread (docs/study.md, "Minimum detectable difference"); once the runs of
a contrast exist, this measures both variances and recomputes the MDE with the same formula
(``herl_core.stats.min_detectable_difference``):

* per seed s, the per-prompt difference d[s][i] of the two arms' final held-out all-met shares;
* ``prompt_var`` = the mean over seeds of the variance over prompts of d[s][·];
* ``seed_var`` = the variance over seeds of the run-level difference mean_i d[s][i].

    python -m benchmarks.study_mde --results results/study/targeted --a herl --b grpo_equal_tokens

writes ``benchmarks/results/study_mde_<name of results>.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from flows.study_report import collect_run, paired_table
from herl_core.stats import min_detectable_difference


def final_outcomes(folder: Path) -> dict[str, float]:
    """{prompt id: all-met share} of the run's last validation (the primary metric's per-prompt values)."""
    outcomes = collect_run(folder)["outcomes"]
    return outcomes[max(outcomes)]


def study_mde(results: Path, a: str, b: str, seeds_for: tuple[int, ...] = (3, 5, 10)) -> dict[str, Any]:
    """Measured variances of the paired difference a − b and the MDE at 128-prompt designs of several seed counts."""

    def finished(arm: str) -> dict[int, dict[str, float]]:  # {seed: final outcomes} of the arm's finished runs
        folders = (f for f in results.glob(f"{arm}-s*") if (f / "study_run.json").is_file())
        return {int(f.name.removeprefix(f"{arm}-s")): final_outcomes(f) for f in folders}

    paired = paired_table(finished(a), finished(b))  # the pairing the report's paired differences use
    if paired is None or len(paired[0]) < 2:
        raise SystemExit(f"{results}: {a} − {b} needs at least two seeds with both runs finished")
    seeds, table = paired
    per_seed = [statistics.mean(d) for d in table]
    seed_var, prompt_var = statistics.variance(per_seed), statistics.mean(statistics.variance(d) for d in table)
    n_prompts = len(table[0])
    return {
        "contrast": f"{a} − {b}",
        "seeds": seeds,
        "per_seed_difference": per_seed,
        "seed_sd": seed_var**0.5,
        "prompt_var": prompt_var,
        "n_prompts": n_prompts,
        "mde": {str(s): min_detectable_difference(prompt_var, n_prompts, seed_var, s)["mde"] for s in seeds_for},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, required=True, help="a study's results_dir")
    parser.add_argument("--a", required=True, help="arm A of the contrast A − B")
    parser.add_argument("--b", required=True, help="arm B")
    args = parser.parse_args()
    out = study_mde(args.results, args.a, args.b)
    path = Path("benchmarks/results") / f"study_mde_{args.results.name}.json"
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
