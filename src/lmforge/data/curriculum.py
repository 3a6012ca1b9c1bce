"""data.curriculum: the difficulty levels of training rows, and the rows each step of the curriculum
phase draws (competence-based curriculum, Platanios et al. 2019).

When the data is prepared (prepare.py), every training example gets a difficulty (its length in
tokens, a record field, or its stage), the examples are ranked and cut into levels, and rows are
packed within a level and stored easiest first, each with its level.

When training (loader.step_data), optimizer step t (0-based) of the curriculum phase takes its rows
from the pool of step t alone; which ones is a function of (seed, t) and nothing else, so every
process of a job computes the same draw and takes its share, and a resumed run draws what the
uninterrupted one did without any saved state. After the phase, training goes through all the rows
in the usual seeded epochs.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from functools import cached_property

import numpy as np

DRAW_STREAM = 0x637572
"""Part of every curriculum draw's seed, so that its random streams are not the epochs' (seeded by
(seed, epoch))."""


def difficulty_levels(difficulty: np.ndarray, tie: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """The level (0..levels-1) and the difficulty rank of each example.

    Examples are ranked by (difficulty, tie) and the ranking is cut into `levels` buckets of equal
    count. Examples of one record (equal difficulty and tie: the pieces of a text cut at max_length,
    the copies of a weighted record) all take the level of the first of them, so that a record never
    straddles two levels.
    """
    n = len(difficulty)
    ranked = np.lexsort((tie, difficulty))  # by difficulty, then by tie
    bucket = (np.arange(n, dtype=np.int64) * levels) // max(n, 1)
    d, t = difficulty[ranked], tie[ranked]
    first = np.ones(n, dtype=bool)
    first[1:] = (d[1:] != d[:-1]) | (t[1:] != t[:-1])
    group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    level, rank = np.empty(n, dtype=np.int32), np.empty(n, dtype=np.int64)
    level[ranked] = bucket[group_start]
    rank[ranked] = np.arange(n)
    return level, rank


@dataclass(frozen=True)
class CurriculumPhase:
    """Which rows each optimizer step of the curriculum phase draws from.

    `levels` holds each training row's level; rows are stored easiest first (prepare.py), so the
    difficulty rank of the rows is their order by level, stored order within a level.
    """

    levels: np.ndarray
    kind: str
    """linear, step or stages."""
    seed: int
    start: float = 1.0
    """linear/step: the share of the rows available at step 0."""
    end: float = 0.0
    """Steps of the phase (t < end draws from a pool); inf for stages whose last runs to the end."""
    stage_ends: tuple[int, ...] = ()
    """stages: the until_step of each stage but an open last one."""

    @classmethod
    def of(cls, config, levels: np.ndarray, total_steps: int) -> CurriculumPhase | None:
        """The phase data.curriculum asks for over a run of `total_steps` steps (None without one)."""
        curriculum = config.data.curriculum
        if curriculum is None:
            return None
        if curriculum.stages:
            ends = tuple(s.until_step for s in curriculum.stages if s.until_step is not None)
            open_end = curriculum.stages[-1].until_step is None
            return cls(levels, "stages", config.seed, end=math.inf if open_end else ends[-1], stage_ends=ends)
        steps = curriculum.steps or max(1, total_steps // 2)
        return cls(levels, curriculum.schedule, config.seed, start=curriculum.start, end=steps)

    @cached_property
    def ranked(self) -> np.ndarray:
        """Row indices, easiest first."""
        return np.argsort(self.levels, kind="stable")

    def in_phase(self, t: int) -> bool:
        return t < self.end

    def stage(self, t: int) -> int:
        """stages: the stage of step t (0-based; step t + 1 as logged)."""
        return bisect_right(self.stage_ends, t)

    def segment(self, t: int) -> tuple[int, int, np.ndarray]:
        """(key, first step, pool) of step t: the pool is the same for the steps of a segment, which
        go through seeded permutations of it (a linear schedule's pool changes every step)."""
        if self.kind == "stages":
            k = self.stage(t)
            return k, self.stage_ends[k - 1] if k else 0, np.flatnonzero(self.levels == k)
        ranked = self.ranked
        n = len(ranked)
        if self.kind == "linear":
            competence = self.start + (1 - self.start) * t / self.end
            return t, t, ranked[: min(n, max(1, math.ceil(competence * n)))]
        first_level = int(self.levels[ranked[max(1, math.ceil(self.start * n)) - 1]])
        top = int(self.levels.max())
        intervals = top - first_level + 1
        i = t * intervals // int(self.end)
        first = -(-i * int(self.end) // intervals)  # the first step of interval i
        return i, first, np.flatnonzero(self.levels <= first_level + i)

    def pool(self, t: int) -> np.ndarray:
        """The rows step t may draw from."""
        return self.segment(t)[2]

    def draw(self, t: int, count: int) -> np.ndarray:
        """The `count` rows of step t (all processes together), a function of (seed, t) alone.

        Within a segment, consecutive steps take consecutive slices of an endless sequence of seeded
        permutations of the pool (pass p: seeded by (seed, key, p)): no row repeats within a pass,
        and a pool smaller than a step is gone through more than once.
        """
        key, first, pool = self.segment(t)
        offset = (t - first) * count
        n = len(pool)
        taken: list[np.ndarray] = []
        passes, within = divmod(offset, n)
        while count > 0:
            permutation = np.random.default_rng([self.seed, DRAW_STREAM, key, passes]).permutation(n)
            piece = permutation[within : within + count]
            taken.append(piece)
            count -= len(piece)
            passes, within = passes + 1, 0
        return pool[np.concatenate(taken)]
