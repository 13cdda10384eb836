"""Probe plans: which blocks share one Hessian-vector product.

A plan partitions the L blocks into groups. For probe index ``k`` and group ``g`` the
probe ``z^(k,g)`` equals the global counter-based probe ``z^(k)`` on the tensors of the
group's blocks and 0 elsewhere; one HVP ``w = H z^(k,g)`` then gives, for every block
``b`` of the group, the sample

.. math:: t_b^{(k)} = z_b^{(k)\\top} (H z^{(k,g)})_b
          = z_b^\\top H_{bb} z_b + \\sum_{c \\in g, c \\ne b} z_b^\\top H_{bc} z_c,

which is unbiased for ``tr H_bb`` with variance ``V0_b + sum_{c in g, c != b} ||H_bc||_F^2``
(``docs/maths.md`` section 1). The plan only decides which cross-block terms stay in the variance:

* ``global``: one group holding every block (the seed paper's method, one HVP per probe);
* ``isolated``: one group per block (no cross terms, L HVPs per probe);
* ``colored``: G groups chosen so strongly coupled blocks are apart (see
  :mod:`hutchtrace.estimate.coloring`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ProbePlan", "global_plan", "isolated_plan"]


@dataclass(frozen=True)
class ProbePlan:
    """A partition of block indices into probe groups.

    Attributes:
        name: ``"global"``, ``"isolated"`` or ``"colored"``.
        groups: tuple of tuples of block indices; every block appears exactly once.
    """

    name: str
    groups: tuple[tuple[int, ...], ...]

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def group_of_block(self, num_blocks: int) -> list[int]:
        out = [-1] * num_blocks
        for g, members in enumerate(self.groups):
            for b in members:
                out[b] = g
        if min(out) < 0:
            missing = [b for b, g in enumerate(out) if g < 0]
            raise ValueError(f"probe plan {self.name!r} leaves blocks {missing} unprobed")
        return out

    def describe(self) -> str:
        return f"{self.name} ({self.num_groups} HVP{'s' if self.num_groups != 1 else ''} per probe)"


def global_plan(num_blocks: int) -> ProbePlan:
    return ProbePlan("global", (tuple(range(num_blocks)),))


def isolated_plan(num_blocks: int) -> ProbePlan:
    return ProbePlan("isolated", tuple((b,) for b in range(num_blocks)))
