"""Retention policy on synthetic backup lists: no files, no database, just timestamps."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from ops.backup.retention import (
    Candidate,
    GfsRetention,
    KeepDaily,
    KeepLast,
    KeepMonthly,
    KeepWeekly,
    create_policy,
    describe_plan,
)


def at(text: str, verified: bool = False, suffix: str = "") -> Candidate:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return Candidate(id=text + suffix, taken_at=moment, verified=verified)


def kept(policy: GfsRetention, candidates: list[Candidate]) -> set[str]:
    return set(policy.plan(candidates).keep)


def gfs(last: int = 0, daily: int = 0, weekly: int = 0, monthly: int = 0) -> GfsRetention:
    return GfsRetention(
        (KeepLast(last), KeepDaily(daily), KeepWeekly(weekly), KeepMonthly(monthly))
    )


@pytest.mark.parametrize(
    ("text", "expected_class", "count"),
    [
        ("last 7", KeepLast, 7),
        ("daily:7", KeepDaily, 7),
        ("WEEKLY=4", KeepWeekly, 4),
        ("  monthly 12 ", KeepMonthly, 12),
        ("daily 0", KeepDaily, 0),
    ],
)
def test_policy_factory_parses_each_policys_syntax(
    text: str, expected_class: type, count: int
) -> None:
    policy = create_policy(text)
    assert type(policy) is expected_class
    assert policy.count == count


@pytest.mark.parametrize("text", ["yearly 3", "last", "daily -1", "last seven", ""])
def test_policy_factory_rejects_unknown_syntax(text: str) -> None:
    with pytest.raises(ValueError, match="retention policy"):
        create_policy(text)


def test_retention_keeps_the_last_n_and_deletes_the_rest_oldest_first() -> None:
    backups = [at(f"2026-01-{day:02d}T03:00:00") for day in range(1, 11)]
    plan = gfs(last=3).plan(backups)
    assert set(plan.keep) == {"2026-01-10T03:00:00", "2026-01-09T03:00:00", "2026-01-08T03:00:00"}
    assert [c.id for c in plan.delete] == [f"2026-01-{day:02d}T03:00:00" for day in range(1, 8)]


def test_daily_keeps_newest_of_each_day_when_several_backups_share_a_day() -> None:
    backups = [
        at("2026-03-01T01:00:00"),
        at("2026-03-01T13:00:00"),
        at("2026-03-01T23:59:59"),
        at("2026-03-02T00:00:00"),
        at("2026-03-02T06:00:00"),
    ]
    assert kept(gfs(daily=2), backups) == {"2026-03-01T23:59:59", "2026-03-02T06:00:00"}


def test_daily_counts_days_that_have_backups_not_calendar_days() -> None:
    # A ten-day outage must not make "keep 3 daily" keep only what is left of three days.
    backups = [at("2026-03-01T03:00:00"), at("2026-03-02T03:00:00"), at("2026-03-13T03:00:00")]
    assert kept(gfs(daily=3), backups) == {c.id for c in backups}


def test_days_are_utc_days_whatever_offset_the_timestamp_carries() -> None:
    # 01:30 at +02:00 on the 2nd is 23:30 UTC on the 1st: same day as the 22:00 UTC backup.
    late = Candidate("late", datetime(2026, 3, 2, 1, 30, tzinfo=timezone(timedelta(hours=2))))
    early = at("2026-03-01T22:00:00")
    assert kept(gfs(daily=5), [late, early]) == {"late"}


def test_naive_timestamps_are_read_as_utc() -> None:
    naive = Candidate("naive", datetime(2026, 3, 1, 23, 30))
    aware = at("2026-03-01T23:00:00")
    assert kept(gfs(daily=5), [naive, aware]) == {"naive"}


def test_weekly_uses_iso_weeks_across_the_year_boundary_with_week_53() -> None:
    # 2020 has an ISO week 53: Mon 2020-12-28 .. Sun 2021-01-03; 2021-W01 starts Mon 2021-01-04.
    backups = [
        at("2020-12-27T03:00:00"),  # Sunday, 2020-W52
        at("2020-12-28T03:00:00"),  # Monday, 2020-W53
        at("2020-12-31T03:00:00"),  # 2020-W53
        at("2021-01-03T03:00:00"),  # Sunday, still 2020-W53
        at("2021-01-04T03:00:00"),  # 2021-W01
    ]
    assert kept(gfs(weekly=3), backups) == {
        "2021-01-04T03:00:00",
        "2021-01-03T03:00:00",
        "2020-12-27T03:00:00",
    }


def test_iso_week_one_can_start_in_the_previous_calendar_year() -> None:
    # 2024-12-30 (Monday) belongs to 2025-W01, together with 2025-01-05.
    backups = [at("2024-12-29T03:00:00"), at("2024-12-30T03:00:00"), at("2025-01-05T03:00:00")]
    assert kept(gfs(weekly=5), backups) == {"2025-01-05T03:00:00", "2024-12-29T03:00:00"}


def test_monthly_keeps_newest_of_each_month_at_month_ends_and_leap_day() -> None:
    backups = [
        at("2024-01-31T23:59:59"),
        at("2024-02-01T00:00:00"),
        at("2024-02-28T03:00:00"),
        at("2024-02-29T03:00:00"),  # leap day: newest of February
        at("2024-03-01T00:00:00"),
        at("2024-04-30T23:59:59"),
    ]
    assert kept(gfs(monthly=4), backups) == {
        "2024-04-30T23:59:59",
        "2024-03-01T00:00:00",
        "2024-02-29T03:00:00",
        "2024-01-31T23:59:59",
    }


def test_equal_timestamps_are_decided_by_id_the_same_way_every_time() -> None:
    moment = "2026-05-05T03:00:00"
    backups = [at(moment, suffix=f"-{tag}") for tag in ("a", "c", "b")]
    first = gfs(last=1, daily=1).plan(backups)
    for _ in range(10):
        random.shuffle(backups)
        again = gfs(last=1, daily=1).plan(backups)
        assert again.keep == first.keep
        assert [c.id for c in again.delete] == [c.id for c in first.delete]
    assert set(first.keep) == {f"{moment}-c"}
    assert [c.id for c in first.delete] == [f"{moment}-a", f"{moment}-b"]


def test_retention_keeps_newest_verified_backup() -> None:
    backups = [at(f"2026-01-{day:02d}T03:00:00", verified=day in (2, 4)) for day in range(1, 9)]
    plan = gfs(last=2).plan(backups)
    assert set(plan.keep) == {"2026-01-08T03:00:00", "2026-01-07T03:00:00", "2026-01-04T03:00:00"}
    assert plan.keep["2026-01-04T03:00:00"] == ["newest verified backup"]
    assert "2026-01-02T03:00:00" in {c.id for c in plan.delete}  # an older verified one may go


def test_retention_with_every_count_zero_still_keeps_the_newest() -> None:
    backups = [at("2026-01-01T03:00:00"), at("2026-01-02T03:00:00")]
    plan = gfs().plan(backups)
    assert set(plan.keep) == {"2026-01-02T03:00:00"}


def test_retention_of_nothing_deletes_nothing() -> None:
    plan = gfs(last=1).plan([])
    assert plan.keep == {} and plan.delete == []


def test_grandfather_father_son_over_a_year_of_daily_backups() -> None:
    start = datetime(2025, 1, 1, 3, 0, tzinfo=UTC)
    backups = [Candidate(f"b{n:03d}", start + timedelta(days=n)) for n in range(400)]
    assert backups[-1].taken_at == datetime(2026, 2, 4, 3, 0, tzinfo=UTC)  # Wednesday, 2026-W06
    plan = GfsRetention.from_counts(last=7, daily=7, weekly=4, monthly=6).plan(backups)
    kept_days = sorted(c.taken_at.date().isoformat() for c in backups if c.id in plan.keep)
    monthly = ["2025-09-30", "2025-10-31", "2025-11-30", "2025-12-31", "2026-01-31"]
    weekly = ["2026-01-18", "2026-01-25", "2026-02-01"]  # Sundays closing W03, W04, W05
    last_and_daily = [f"2026-01-{d}" for d in (29, 30, 31)] + [f"2026-02-0{d}" for d in range(1, 5)]
    assert kept_days == sorted(set(monthly + weekly + last_and_daily))
    assert len(plan.delete) == 400 - len(kept_days) == 400 - 13


def test_plan_description_names_reasons_for_kept_backups() -> None:
    backups = [at("2026-01-01T03:00:00"), at("2026-01-02T03:00:00")]
    lines = describe_plan(gfs(last=1).plan(backups))
    assert lines == [
        "delete 2026-01-01T03:00:00",
        "keep   2026-01-02T03:00:00: one of the last 1",
    ]
