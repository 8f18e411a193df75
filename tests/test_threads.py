"""torch's threads for CPU runs: idle cores less loader workers, unless OMP_NUM_THREADS or an option chose."""

from __future__ import annotations

import pytest
import torch

from regcache import threads


@pytest.fixture
def machine(monkeypatch):
    """A machine of ``cores`` CPUs with a 1-minute load of ``load``; torch's thread count restored afterwards."""
    saved = torch.get_num_threads()

    def set_machine(cores: int, load: float) -> None:
        monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _pid: set(range(cores)))
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
        monkeypatch.setattr(threads, "open", lambda *_a, **_k: (_ for _ in ()).throw(OSError()), raising=False)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield set_machine
    torch.set_num_threads(saved)


@pytest.mark.parametrize(
    ("cores", "load", "workers", "processes", "expected"),
    [
        (2, 0.2, 0, 1, 2),  # idle: every core
        (2, 1.3, 0, 1, 1),  # another job holds a core: one thread, not two waiting on it
        (2, 5.4, 0, 1, 1),  # overloaded: still one
        (16, 0.0, 4, 1, 12),  # the workers' cores are left to them
        (16, 2.0, 2, 2, 5),  # two ranks share the 14 idle cores with their 2 + 2 workers
        (4, 0.0, 8, 1, 1),  # more workers than cores: one thread
    ],
)
def test_rule(machine, cores, load, workers, processes, expected):
    machine(cores, load)
    assert threads.choose_threads(workers, processes) == expected


def test_configure_sets_torch_unless_the_user_chose(machine, monkeypatch):
    machine(4, 1.0)
    assert threads.configure_threads() == (3, "idle cores") and torch.get_num_threads() == 3
    assert threads.configure_threads(explicit=2) == (2, "explicit option") and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert threads.configure_threads() == (1, "OMP_NUM_THREADS")
    with pytest.raises(ValueError, match="threads must be >= 1"):
        threads.configure_threads(explicit=0)


def test_cgroup_quota_caps_the_cores(monkeypatch):
    import io

    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _pid: set(range(8)))
    monkeypatch.setattr(threads, "open", lambda *_a, **_k: io.StringIO("150000 100000\n"), raising=False)
    assert threads.available_cores() == 2


def test_demo_sets_threads_before_running(machine, monkeypatch, capsys):
    from regcache import demo

    machine(4, 0.0)
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: seen.setdefault("threads", torch.get_num_threads()))
    assert demo.main(["--out", "unused"]) == 0
    assert seen["threads"] == 4 and "torch threads: 4 (idle cores)" in capsys.readouterr().out
    assert demo.main(["--out", "unused", "--threads", "1", "--quiet"]) == 0
    assert torch.get_num_threads() == 1
    with pytest.raises(SystemExit):
        demo.main(["--threads", "0"])


def test_validate_on_cpu_sets_threads_from_the_loader_workers(machine, tmp_path):
    """The suite's setup on a CPU trainer: 4 idle cores, 1 loader worker -> 3 threads."""
    from types import SimpleNamespace

    from datamodules.suite import ValidationSuite

    machine(4, 0.0)
    suite = ValidationSuite(root="builtin", datasets={"cifar10_sample": {}}, num_workers=1)
    suite.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), num_devices=1)
    suite.setup("validate")
    assert torch.get_num_threads() == 3
