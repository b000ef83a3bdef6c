"""loratune/__init__.py: the OpenMP wait policy chosen before torch is imported."""
import io
import os

import pytest

import loratune


@pytest.fixture
def no_policy(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)


@pytest.mark.parametrize("busy, expected", [(False, None), (True, "PASSIVE")])
def test_threads_sleep_only_on_a_busy_machine(monkeypatch, no_policy, busy, expected):
    monkeypatch.setattr(loratune, "_machine_busy", lambda: busy)
    loratune._default_wait_policy()
    assert os.environ.get("OMP_WAIT_POLICY") == expected


@pytest.mark.parametrize("var, value", [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "1000")])
def test_the_users_setting_wins(monkeypatch, no_policy, var, value):
    monkeypatch.setenv(var, value)
    monkeypatch.setattr(loratune, "_machine_busy", lambda: True)
    loratune._default_wait_policy()
    assert os.environ.get("OMP_WAIT_POLICY") == ("ACTIVE" if var == "OMP_WAIT_POLICY" else None)


@pytest.mark.parametrize("runnable, busy", [([1] * 7, False), ([1, 2, 1, 1, 2, 1, 1], False),
                                            ([2, 3, 2, 1, 2, 2, 1], True)])
def test_busy_means_another_thread_runnable_in_most_samples(monkeypatch, runnable, busy):
    """/proc/loadavg's 4th field is runnable/total threads; the reading process itself is one of the runnable."""
    lines = iter(f"0.00 0.00 0.00 {n}/80 123\n" for n in runnable)
    monkeypatch.setattr(loratune, "open", lambda path: io.StringIO(next(lines)), raising=False)
    assert loratune._machine_busy(interval_s=0) is busy


def test_without_proc_the_load_average_decides(monkeypatch):
    def missing(path):
        raise OSError("no /proc")

    monkeypatch.setattr(loratune, "open", missing, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert loratune._machine_busy() is False
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    assert loratune._machine_busy() is True
