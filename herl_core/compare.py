"""Compare two computations of the same generate call, asserting only what float rounding allows.

Two engines, batch layouts or CPUs compute the same scores with different rounding (herl_core.rollout.hf,
"Reproducibility"). What then holds, and what ``compare_generations`` checks:

* the rows are the same prompts in the same order;
* every draw whose margin (``Generation.margins``) exceeds ``margin`` in both computations gives the same token, and
  equal tokens have log-probs within ``logprob_atol``;
* at the first draw whose margin is below ``margin`` the two rows may take different tokens; the rest of such a row is
  conditioned on another prefix and is not compared ("cut");
* a row that is never cut has the same length, text and ``finished`` flag.

``margin`` should be a safe multiple of the rounding the two computations can differ by (the tests use 1e-3 against a
measured ~1e-5 on the tiny test model). A generation without margins (an engine that does not report them) counts as
having infinite margins: its tokens must then match exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from herl_core.rollout.base import Generation


@dataclass
class DrawComparison:
    """The result of ``compare_generations``. ``ok`` = no violation."""

    rows: int = 0
    compared_tokens: int = 0
    cut_rows: list[int] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    max_logprob_diff: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def full_rows(self) -> int:
        """Rows compared to their end (not cut at a near-tie draw)."""
        return self.rows - len(self.cut_rows)


def _margin(g: Generation, t: int) -> float:
    return g.margins[t] if t < len(g.margins) else float("inf")


def compare_generations(
    a: list[Generation], b: list[Generation], *, margin: float, logprob_atol: float
) -> DrawComparison:
    """Check ``a`` against ``b`` row by row (module doc); every violation is described in ``violations``."""
    out = DrawComparison(rows=len(a))
    if len(a) != len(b):
        out.violations.append(f"{len(a)} generations against {len(b)}")
        return out
    for row, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.prompt_ids != y.prompt_ids:
            out.violations.append(f"row {row}: different prompts")
            continue
        cut = False
        for t in range(min(len(x.completion_ids), len(y.completion_ids))):
            near_tie = min(_margin(x, t), _margin(y, t)) <= margin
            if x.completion_ids[t] != y.completion_ids[t]:
                if near_tie:
                    cut = True
                    break
                out.violations.append(
                    f"row {row}, token {t}: {x.completion_ids[t]} != {y.completion_ids[t]} with margins "
                    f"{_margin(x, t):.3g} / {_margin(y, t):.3g} (> {margin:g}: rounding cannot explain it)"
                )
                break
            out.compared_tokens += 1
            if t < len(x.logprobs) and t < len(y.logprobs):
                diff = abs(x.logprobs[t] - y.logprobs[t])
                out.max_logprob_diff = max(out.max_logprob_diff, diff)
                if diff > logprob_atol:
                    out.violations.append(f"row {row}, token {t}: log-probs differ by {diff:.3g} > {logprob_atol:g}")
        if cut:
            out.cut_rows.append(row)
        elif (x.completion_ids, x.finished, x.text) != (y.completion_ids, y.finished, y.text):
            if not any(v.startswith(f"row {row},") for v in out.violations):
                out.violations.append(
                    f"row {row}: lengths {len(x.completion_ids)} / {len(y.completion_ids)}, finished "
                    f"{x.finished} / {y.finished}"
                )
    return out
