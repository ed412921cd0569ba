"""Grandfather-father-son retention as pure code: which backups to keep, which to delete, and why.

Policies are small classes, each parsing its own syntax in ``create()`` (``"last 7"``,
``"daily 7"``, ``"weekly 4"``, ``"monthly 6"``); :func:`create_policy` tries them in turn. Every
decision comes from the timestamps recorded in the manifests, read as UTC, never from file
mtimes, which a copy or a restore from tape changes.

A policy keeps the newest backup of each of its N most recent periods *that have a backup*
(restic and borg count the same way), so a week without backups does not silently shorten what
is kept.

Timestamps come from files anyone with access to the directory can write, and from hosts
whose clocks may disagree. A backup dated more than ``FUTURE_TOLERANCE`` ahead of now is not
trusted for ordering or bucketing: it takes no policy slot, is never deleted, and is reported.
A backup the caller names as protected (the one a run has just taken) is never deleted either.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import ClassVar

# Clocks of hosts sharing a volume disagree by seconds, not minutes.
FUTURE_TOLERANCE = timedelta(minutes=5)


def is_future(moment: datetime, now: datetime) -> bool:
    """``moment`` is later than ``now`` by more than clock skew explains."""
    return moment > now + FUTURE_TOLERANCE


@dataclass(frozen=True)
class Candidate:
    """What retention needs to know about one good backup."""

    id: str
    taken_at: datetime
    verified: bool = False

    @property
    def utc(self) -> datetime:
        if self.taken_at.tzinfo is None:
            return self.taken_at.replace(tzinfo=UTC)
        return self.taken_at.astimezone(UTC)


def newest_first(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Newest first; equal timestamps are ordered by id so every run decides the same way."""
    return sorted(candidates, key=lambda c: (c.utc, c.id), reverse=True)


class RetentionPolicy:
    """Keeps some backups; ``create`` parses ``"<keyword> <count>"``."""

    keyword: ClassVar[str]
    _syntax: ClassVar[re.Pattern[str]] = re.compile(r"^\s*([a-z]+)\s*[ :=]?\s*(\d+)\s*$", re.I)

    def __init__(self, count: int) -> None:
        if count < 0:
            raise ValueError(f"{self.keyword}: count must be >= 0")
        self.count = count

    @classmethod
    def create(cls, text: str) -> RetentionPolicy | None:
        match = cls._syntax.match(text)
        if not match or match.group(1).lower() != cls.keyword:
            return None
        return cls(int(match.group(2)))

    def reason(self) -> str:
        raise NotImplementedError

    def keep(self, ordered: Sequence[Candidate]) -> list[Candidate]:
        """The backups this policy keeps, from a newest-first list."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self.keyword} {self.count}"


class KeepLast(RetentionPolicy):
    keyword = "last"

    def reason(self) -> str:
        return f"one of the last {self.count}"

    def keep(self, ordered: Sequence[Candidate]) -> list[Candidate]:
        return list(ordered[: self.count])


class _PeriodPolicy(RetentionPolicy):
    """Newest backup in each of the ``count`` most recent periods that have one."""

    period: ClassVar[str]

    @staticmethod
    def bucket(moment: datetime) -> Hashable:
        raise NotImplementedError

    def reason(self) -> str:
        return f"newest of its {self.period} (keep {self.count} {self.keyword})"

    def keep(self, ordered: Sequence[Candidate]) -> list[Candidate]:
        kept: list[Candidate] = []
        seen: set[Hashable] = set()
        for candidate in ordered:
            if len(seen) >= self.count:
                break
            key = self.bucket(candidate.utc)
            if key not in seen:
                seen.add(key)
                kept.append(candidate)
        return kept


class KeepDaily(_PeriodPolicy):
    keyword, period = "daily", "day"

    @staticmethod
    def bucket(moment: datetime) -> Hashable:
        return moment.date()


class KeepWeekly(_PeriodPolicy):
    """ISO weeks: 2020-12-31 (Thursday) and 2021-01-01 (Friday) share week 2020-W53."""

    keyword, period = "weekly", "ISO week"

    @staticmethod
    def bucket(moment: datetime) -> Hashable:
        iso = moment.isocalendar()
        return (iso.year, iso.week)


class KeepMonthly(_PeriodPolicy):
    keyword, period = "monthly", "month"

    @staticmethod
    def bucket(moment: datetime) -> Hashable:
        return (moment.year, moment.month)


POLICY_CLASSES: tuple[type[RetentionPolicy], ...] = (KeepLast, KeepDaily, KeepWeekly, KeepMonthly)


def create_policy(text: str) -> RetentionPolicy:
    """The policy ``text`` describes; ``ValueError`` naming the accepted forms otherwise."""
    for policy_class in POLICY_CLASSES:
        policy = policy_class.create(text)
        if policy is not None:
            return policy
    forms = ", ".join(f"'{c.keyword} N'" for c in POLICY_CLASSES)
    raise ValueError(f"unknown retention policy {text!r}; expected one of {forms}")


@dataclass
class RetentionPlan:
    """The decision: reasons for every kept backup, and the backups to delete (oldest first)."""

    keep: dict[str, list[str]] = field(default_factory=dict)
    delete: list[Candidate] = field(default_factory=list)
    future: list[Candidate] = field(default_factory=list)  # dated ahead of now: kept, untrusted


@dataclass(frozen=True)
class GfsRetention:
    """The union of its policies, plus the one rule no count can override."""

    policies: tuple[RetentionPolicy, ...]

    @classmethod
    def from_counts(cls, last: int, daily: int, weekly: int, monthly: int) -> GfsRetention:
        return cls(
            (
                create_policy(f"last {last}"),
                create_policy(f"daily {daily}"),
                create_policy(f"weekly {weekly}"),
                create_policy(f"monthly {monthly}"),
            )
        )

    def plan(
        self,
        candidates: Iterable[Candidate],
        *,
        now: datetime | None = None,
        protected: Collection[str] = (),
    ) -> RetentionPlan:
        """``now`` (default: the current time) decides what is dated in the future;
        ``protected`` ids are kept whatever their dates say."""
        now = datetime.now(UTC) if now is None else now.astimezone(UTC)
        everything = newest_first(candidates)
        plan = RetentionPlan(future=[c for c in everything if is_future(c.utc, now)])
        ordered = [c for c in everything if c not in plan.future]

        def mark(candidate: Candidate, why: str) -> None:
            plan.keep.setdefault(candidate.id, []).append(why)

        for policy in self.policies:
            for candidate in policy.keep(ordered):
                mark(candidate, policy.reason())
        newest_verified = next((c for c in ordered if c.verified), None)
        if newest_verified is not None:
            mark(newest_verified, "newest verified backup")
        # An empty policy set must never mean "delete everything": the newest always stays.
        if ordered and not any(c.id in plan.keep for c in ordered):
            mark(ordered[0], "newest backup")
        for candidate in everything:
            if candidate.id in protected:
                mark(candidate, "taken by this run")
        for candidate in plan.future:
            mark(
                candidate, f"dated in the future ({candidate.utc:%Y-%m-%d %H:%M:%S} UTC): untrusted"
            )
        plan.delete = [c for c in reversed(everything) if c.id not in plan.keep]
        return plan


def describe_plan(plan: RetentionPlan, label: Callable[[str], str] = str) -> list[str]:
    """Human lines: what goes and what stays, and why."""
    lines = [f"delete {label(c.id)}" for c in plan.delete]
    lines += [f"keep   {label(i)}: {'; '.join(why)}" for i, why in plan.keep.items()]
    return lines
