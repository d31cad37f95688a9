"""Counting the rounds in which too few departments trained (the job's early end)."""

from __future__ import annotations

from common import keys
from server.recording import idle_reason, idle_rounds
from server.records import DepartmentRound, RoundRecord


def _round(n: int, **statuses: str) -> RoundRecord:
    return RoundRecord(round=n, departments={name: DepartmentRound(status=s, reason="why" if s != keys.STATUS_TRAINED
                                                                   else None) for name, s in statuses.items()})


def test_trailing_rounds_with_too_few_trainers_are_counted() -> None:
    trained, declined = keys.STATUS_TRAINED, keys.STATUS_DECLINED_BUDGET
    rounds = [_round(1, a=trained, b=trained), _round(2, a=trained, b=declined), _round(3, a=declined, b=declined)]
    assert idle_rounds(rounds, 2) == 2
    assert idle_rounds(rounds, 1) == 1
    assert idle_rounds(rounds[:1], 2) == 0
    assert idle_rounds([], 2) == 0
    assert idle_rounds([_round(1)], 1) == 1  # nobody answered


def test_the_reason_names_each_department_and_why() -> None:
    rounds = [_round(1, a=keys.STATUS_TRAINED, b=keys.STATUS_DROPPED)]
    assert idle_reason(rounds, 2) == ("fewer than min-departments (2) departments trained in 1 consecutive round(s); "
                                      "last round: a: trained, b: dropped (why)")
    assert idle_reason([_round(1)], 2).endswith("no department answered")
