"""A pytest plugin: the conformance suite's cases as ordinary tests, for a vendor's CI.

    pytest --deepport-backend NAME [--deepport-tier smoke|full] [--deepport-op OP ...]
           [--deepport-case PATTERN ...] [--deepport-device DEV] [--deepport-seed N]
           [--deepport-plugin MODULE[:ATTR] ...] [--deepport-waivers FILE] [--deepport-isolate]

Installed with deepport, the plugin is registered through the ``pytest11`` entry point; without an
install, load it with ``-p deepport.conformance.pytest_plugin``. It does nothing unless
``--deepport-backend`` is given (it imports nothing of deepport until then). Each (case, backend) is
one test item ``deepport[BACKEND]::CASE_ID`` (``-k`` selects them by case id), run exactly as
``deepport certify`` runs it (same inputs, poisoning, checks, float64 oracle): ``pass`` passes,
``fail``/``error``/``crash``/``timeout`` fail with the harness's message and reproduce line,
``not_supported`` skips with the backend's reasons (a not-supported *core* case is reported as
skipped too: certification, not the test run, decides what a port must support). With
``--deepport-waivers`` (:mod:`deepport.conformance.waivers`) a waived failure is an expected failure
(xfail) and a waived case that passes fails as an unexpected pass. The run seed is random unless
``--deepport-seed`` is given, and shown in the header.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from deepport.conformance.case import Case
    from deepport.conformance.waivers import Waiver

_KEY = pytest.StashKey[dict[str, Any]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("deepport", "deepport conformance suite (runs only with --deepport-backend)")
    group.addoption("--deepport-backend", action="append", default=[], metavar="NAME",
                    help="backend to run the suite on (repeatable; NAME or module:object)")
    group.addoption("--deepport-tier", default="smoke", choices=("smoke", "full"), help="case tier (default: smoke)")
    group.addoption("--deepport-op", action="append", default=[], metavar="OP",
                    help="only the cases of OP (repeatable)")
    group.addoption("--deepport-case", action="append", default=[], metavar="PATTERN",
                    help="only cases whose id matches PATTERN, glob or substring (repeatable: any of them)")
    group.addoption("--deepport-device", default=None, help="torch device (default: cuda if present, else cpu)")
    group.addoption("--deepport-seed", type=int, default=None, help="run seed (default: random, in the header)")
    group.addoption("--deepport-plugin", action="append", default=[], metavar="MODULE[:ATTR]",
                    help="import an out-of-tree backend first (repeatable)")
    group.addoption("--deepport-waivers", default=None, metavar="FILE",
                    help="expected failures (TOML or JSON): waived failures xfail, unexpected passes fail")
    group.addoption("--deepport-isolate", action="store_true", help="run each backend in its own worker process")


def _state(config: pytest.Config) -> dict[str, Any] | None:
    return config.stash.get(_KEY, None)


def pytest_configure(config: pytest.Config) -> None:
    backends = config.getoption("deepport_backend")
    if not backends:
        return
    from deepport.conformance.isolation import load_plugins
    from deepport.conformance.runner import concrete_device, default_device, select_cases
    from deepport.conformance.waivers import load_waivers
    from deepport.dispatch import registry

    plugins = list(config.getoption("deepport_plugin"))
    load_plugins(plugins)
    names = []
    for item in backends:
        if ":" in item and item not in {b.name for b in registry.all_backends()}:
            names += load_plugins([item])
            plugins.append(item)
        else:
            names.append(registry.get(item).name)  # raises with the registered names
    tier, ops, patterns = config.getoption("deepport_tier"), config.getoption("deepport_op"), \
        config.getoption("deepport_case")
    chosen: dict[str, Case] = {}
    for pattern in patterns or [None]:
        for case in select_cases(tier, ops or None, pattern):
            chosen.setdefault(case.id, case)
    device = config.getoption("deepport_device")
    seed = config.getoption("deepport_seed")
    waivers_file = config.getoption("deepport_waivers")
    waivers: list[Waiver] = load_waivers(waivers_file) if waivers_file else []
    config.stash[_KEY] = {
        "backends": names, "cases": list(chosen.values()), "tier": tier, "plugins": plugins, "waivers": waivers,
        "device": concrete_device(default_device() if device is None else device),
        "seed": secrets.randbits(63) if seed is None else seed, "isolate": config.getoption("deepport_isolate"),
        "workers": {},
    }
    config.addinivalue_line("markers", "deepport: a deepport conformance case (added by --deepport-backend)")


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = _state(config)
    if state is None:
        return []
    return [f"deepport conformance: {len(state['cases'])} {state['tier']}-tier case(s) x backends "
            f"{', '.join(state['backends'])} on {state['device']}; run seed {state['seed']} "
            f"(reproduce with --deepport-seed {state['seed']})"]


class DeepportSuite(pytest.Collector):
    """The cases of one backend."""

    backend: str

    def collect(self) -> Iterator[pytest.Item]:
        state = _state(self.config)
        assert state is not None
        for case in state["cases"]:
            item = DeepportCase.from_parent(self, name=case.id)
            item.case, item.backend = case, self.backend
            item.add_marker("deepport")
            yield item


class DeepportCase(pytest.Item):
    """One (case, backend): run it as ``deepport certify`` would and report the verdict."""

    case: Case
    backend: str

    def runtest(self) -> None:
        from deepport.conformance.isolation import BackendWorker
        from deepport.conformance.results import Status
        from deepport.conformance.runner import run_case
        from deepport.conformance.waivers import match

        state = _state(self.config)
        assert state is not None
        workers = state["workers"]
        if state["isolate"] and self.backend not in workers:
            workers[self.backend] = BackendWorker(state["plugins"])
        (result,) = run_case(self.case, [self.backend], state["device"], state["seed"], workers)
        waiver = match(state["waivers"], self.case.id, self.backend)
        if waiver is not None:
            if result.status is Status.PASS:
                raise ConformanceFailure(f"unexpected pass: remove the waiver entry {waiver.case!r} ({waiver.reason})")
            pytest.xfail(f"waived ({waiver.category}): {waiver.reason}; {result.status.value}: {result.message}")
        if result.status is Status.NOT_SUPPORTED:
            pytest.skip(f"not supported by {self.backend}: {result.message}")
        if result.status is not Status.PASS:
            raise ConformanceFailure(f"{result.status.value}: {result.message}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, ConformanceFailure):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"deepport[{self.backend}] {self.name}"


class ConformanceFailure(Exception):
    """A case that did not pass (the message is the harness's)."""


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Append every (backend, case) item before ``-k``/``-m`` deselection runs."""
    state = _state(config)
    if state is None:
        return
    for backend in state["backends"]:
        suite = DeepportSuite.from_parent(session, name=f"deepport[{backend}]", nodeid=f"deepport[{backend}]")
        suite.backend = backend
        items.extend(suite.collect())


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = _state(session.config)
    for worker in (state or {}).get("workers", {}).values():
        worker.close()
