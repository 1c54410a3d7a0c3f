"""Backend selection: precedence of the ways to choose, explicit choices that never fall back, automatic
choice by priority, explain, and the registry. Recording backends (see conftest) show what really ran."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import deepport
from deepport.dispatch import Backend, all_backends, device_info, get, one_of, register, registered, verdicts
from deepport.dispatch.selection import choose
from deepport.errors import BackendNotSupportedError, InvalidArgumentError, NoBackendError, UnknownBackendError
from deepport.kernels.mla_decode import MLADecodeSignature

pytestmark = pytest.mark.usefixtures("clean_env")

Runs = list[tuple[str, Any]]
CPU = device_info(torch.device("cpu"))


@pytest.fixture
def inputs(mla_inputs: Callable[..., Any]) -> Any:
    return mla_inputs()  # page 16


@contextlib.contextmanager
def several(*backends: Backend) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for backend in backends:
            stack.enter_context(registered(backend))
        yield


@pytest.fixture
def four(make_backend: Callable[..., Backend]) -> Iterator[None]:
    """alpha, beta, gamma, delta: recording backends never chosen automatically."""
    with several(*(make_backend(n) for n in ("alpha", "beta", "gamma", "delta"))):
        yield


def ran(runs: Runs) -> list[str]:
    return [name for name, _ in runs]


# ---- precedence ---------------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("four")
def test_backend_argument_wins_over_context_and_environment(inputs: Any, runs: Runs,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPPORT_BACKEND", "alpha")
    monkeypatch.setenv("DEEPPORT_BACKEND_MLA_DECODE", "beta")
    with deepport.use_backend("gamma", mla_decode="gamma"):
        deepport.mla_decode(*inputs.args, backend="delta")
    assert ran(runs) == ["delta"]


@pytest.mark.usefixtures("four")
@pytest.mark.parametrize("context", [{"name": "gamma"}, {"mla_decode": "gamma"}], ids=["global", "per-op"])
def test_use_backend_wins_over_both_environment_variables(inputs: Any, runs: Runs, monkeypatch: pytest.MonkeyPatch,
                                                          context: dict[str, str]) -> None:
    monkeypatch.setenv("DEEPPORT_BACKEND", "alpha")
    monkeypatch.setenv("DEEPPORT_BACKEND_MLA_DECODE", "beta")
    name = context.pop("name", None)
    with deepport.use_backend(name, **context):
        deepport.mla_decode(*inputs.args)
    deepport.mla_decode(*inputs.args)
    assert ran(runs) == ["gamma", "beta"]


@pytest.mark.usefixtures("four")
def test_per_op_choice_wins_over_global_choice_in_the_same_block(inputs: Any, runs: Runs) -> None:
    with deepport.use_backend("alpha", mla_decode="beta"):
        deepport.mla_decode(*inputs.args)
    assert ran(runs) == ["beta"]


@pytest.mark.usefixtures("four")
def test_inner_use_backend_block_overrides_the_outer_one_and_is_undone_on_exit(inputs: Any, runs: Runs) -> None:
    with deepport.use_backend("alpha"):
        with deepport.use_backend(mla_decode="beta"):
            deepport.mla_decode(*inputs.args)
            with deepport.use_backend("gamma"):  # an inner global choice replaces the outer per-op one
                deepport.mla_decode(*inputs.args)
            deepport.mla_decode(*inputs.args)
        deepport.mla_decode(*inputs.args)
    assert ran(runs) == ["beta", "gamma", "beta", "alpha"]
    assert deepport.explain("mla_decode", *inputs.args).source == "automatic"


@pytest.mark.usefixtures("four")
def test_op_environment_variable_wins_over_the_global_one(inputs: Any, runs: Runs,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPPORT_BACKEND", "alpha")
    deepport.mla_decode(*inputs.args)
    monkeypatch.setenv("DEEPPORT_BACKEND_MLA_DECODE", "beta")
    deepport.mla_decode(*inputs.args)
    monkeypatch.setenv("DEEPPORT_BACKEND_MLA_DECODE", "  ")  # blank means unset
    deepport.mla_decode(*inputs.args)
    assert ran(runs) == ["alpha", "beta", "alpha"]


def test_without_any_choice_the_highest_priority_backend_runs(inputs: Any, runs: Runs,
                                                              make_backend: Callable[..., Backend]) -> None:
    assert deepport.explain("mla_decode", *inputs.args).chosen == "torch"  # the built-ins on a CPU
    with registered(make_backend("top", {"cpu": 1000})):
        deepport.mla_decode(*inputs.args)
    assert ran(runs) == ["top"]


def test_use_backend_with_an_unknown_op_name_raises_at_once() -> None:
    with pytest.raises(InvalidArgumentError, match="mla_decod"), deepport.use_backend(mla_decod="torch"):
        pass


# ---- explicit choices ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("way", ["argument", "use_backend", "use_backend-per-op", "env-op", "env"])
def test_explicit_choice_that_cannot_run_raises_with_reasons_and_never_falls_back(
        inputs: Any, runs: Runs, make_backend: Callable[..., Backend], monkeypatch: pytest.MonkeyPatch,
        way: str) -> None:
    page64 = make_backend("page64", {"cpu": 1000}, requirements=(one_of("page_block_size", {64}),))
    kwargs: dict[str, Any] = {}
    context: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if way == "argument":
        kwargs["backend"] = "page64"
    elif way == "use_backend":
        context = deepport.use_backend("page64")
    elif way == "use_backend-per-op":
        context = deepport.use_backend(mla_decode="page64")
    elif way == "env-op":
        monkeypatch.setenv("DEEPPORT_BACKEND_MLA_DECODE", "page64")
    else:
        monkeypatch.setenv("DEEPPORT_BACKEND", "page64")
    with registered(page64), context, pytest.raises(BackendNotSupportedError) as info:
        deepport.mla_decode(*inputs.args, **kwargs)
    assert info.value.backend == "page64" and info.value.op == "mla_decode"
    assert info.value.reasons == ["needs page_block_size in {64}, got page_block_size=16"]
    assert "page_block_size=16" in str(info.value)
    assert runs == []  # neither page64 nor a fallback ran


def test_explicit_choice_of_an_unavailable_backend_raises_with_the_probe_reason(
        inputs: Any, runs: Runs, make_backend: Callable[..., Backend]) -> None:
    with registered(make_backend("gone", probe=lambda: "driver missing")), \
            pytest.raises(BackendNotSupportedError, match="unavailable: driver missing"):
        deepport.mla_decode(*inputs.args, backend="gone")
    assert runs == []


@pytest.mark.parametrize("way", ["argument", "env"])
def test_unknown_backend_name_raises_and_lists_the_registered_ones(inputs: Any, monkeypatch: pytest.MonkeyPatch,
                                                                   way: str) -> None:
    kwargs: dict[str, Any] = {"backend": "nope"} if way == "argument" else {}
    if way == "env":
        monkeypatch.setenv("DEEPPORT_BACKEND", "nope")
    with pytest.raises(UnknownBackendError) as info:
        deepport.mla_decode(*inputs.args, **kwargs)
    assert info.value.name == "nope"
    assert "'nope'" in str(info.value) and "reference" in str(info.value) and "torch" in str(info.value)
    source = "the backend= argument" if way == "argument" else "$DEEPPORT_BACKEND"
    assert info.value.source == source and f"(named by {source})" in str(info.value)


# ---- automatic choice ---------------------------------------------------------------------------------------------

def test_automatic_choice_takes_the_highest_priority_backend_that_can_run(
        inputs: Any, runs: Runs, make_backend: Callable[..., Backend]) -> None:
    contenders = [
        make_backend("low", {"cpu": 500}),
        make_backend("high", {"cpu": 600}),
        make_backend("gpu_only", {"cuda": 10_000}),  # no priority on a CPU: never automatic there
        make_backend("broken", {"*": 900}, probe=lambda: "driver missing"),
        make_backend("page64", {"cpu": 800}, requirements=(one_of("page_block_size", {64}),)),
    ]
    with several(*contenders):
        deepport.mla_decode(*inputs.args)
        with registered(make_backend("higher", {"*": 700})):
            deepport.mla_decode(*inputs.args)
        deepport.mla_decode(*inputs.args)
    assert ran(runs) == ["high", "higher", "high"]


def test_automatic_choice_is_logged_once_per_signature(inputs: Any, mla_inputs: Callable[..., Any], runs: Runs,
                                                       make_backend: Callable[..., Backend],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="deepport.dispatch")
    with several(make_backend("top", {"cpu": 1000}), make_backend("broken", {"cpu": 2000}, probe=lambda: "no gpu")):
        deepport.mla_decode(*inputs.args)
        deepport.mla_decode(*inputs.args)
        deepport.mla_decode(*mla_inputs(lens=(3, 1, 4)).args)  # another batch size: the same signature
        assert len(caplog.records) == 1
        record = caplog.records[0]
        assert record.name == "deepport.dispatch"
        assert "-> top (priority 1000)" in record.getMessage()
        assert "passed over broken: unavailable: no gpu" in record.getMessage()
        deepport.mla_decode(*mla_inputs(s_q=1).args)  # another signature: logged again
        assert len(caplog.records) == 2 and "s_q=1" in caplog.records[1].getMessage()
    assert ran(runs) == ["top"] * 4


def test_automatic_fallback_to_the_reference_backend_is_a_warning(
        inputs: Any, make_backend: Callable[..., Backend], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="deepport.dispatch")
    for name in ("torch", "opencl"):  # every built-in that automatic selection would try before the oracle
        monkeypatch.setitem(get(name).__dict__, "unavailable_reason", "disabled for this test")
    with registered(make_backend("bystander")):  # registry change: no cached choice survives
        assert deepport.explain("mla_decode", *inputs.args).chosen == "reference"
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "-> reference" in record.getMessage() and "float64 NumPy oracle" in record.getMessage()
    assert "passed over torch: unavailable: disabled for this test" in record.getMessage()


def test_the_oracle_warning_comes_from_the_backend_field_not_its_name(
        inputs: Any, make_backend: Callable[..., Backend], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="deepport.dispatch")
    assert get("reference").oracle and not get("torch").oracle
    slow = dataclasses.replace(make_backend("slow_oracle", {"cpu": 1000}), oracle=True)
    with registered(slow):
        assert deepport.explain("mla_decode", *inputs.args).chosen == "slow_oracle"
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "-> slow_oracle" in record.getMessage()


def test_no_backend_error_carries_every_backends_reasons(make_backend: Callable[..., Backend]) -> None:
    sig = MLADecodeSignature(CPU, torch.float32, 1, 4, 1, 64, 32, 16, False)  # no built-in takes float32
    extra = [
        make_backend("gone", {"*": 100}, probe=lambda: "driver missing"),
        make_backend("manual", dtypes=frozenset({torch.float32})),  # could run, but never automatically
    ]
    with several(*extra):
        names = {b.name for b in all_backends()}
        with pytest.raises(NoBackendError) as info:
            choose("mla_decode", sig)
    reasons = info.value.reasons
    assert set(reasons) == names >= {"torch", "reference", "gone", "manual"}
    assert reasons["torch"] == ["needs dtype in {bfloat16, float16}, got float32"]
    assert reasons["gone"] == ["unavailable: driver missing"]
    assert reasons["manual"] == ["not chosen automatically on this device"]
    assert "torch: needs dtype" in str(info.value)


def test_probe_that_raises_makes_the_backend_unavailable_with_the_exception_text(
        inputs: Any, runs: Runs, make_backend: Callable[..., Backend]) -> None:
    def probe() -> str | None:
        raise RuntimeError("libfoo.so: cannot open shared object file")

    with registered(make_backend("crashy", {"cpu": 1000}, probe=probe)) as crashy:
        reason = "unavailable: probe failed: RuntimeError: libfoo.so: cannot open shared object file"
        assert crashy.reasons("mla_decode", MLADecodeSignature(CPU, torch.bfloat16, 1, 4, 1, 64, 32, 16, False)) \
            == [reason]
        deepport.mla_decode(*inputs.args)
        assert ran(runs) == []  # torch ran instead
        with pytest.raises(BackendNotSupportedError, match=r"libfoo\.so"):
            deepport.mla_decode(*inputs.args, backend="crashy")


def test_probe_runs_once_per_backend(inputs: Any, make_backend: Callable[..., Backend]) -> None:
    calls: list[int] = []

    def probe() -> str | None:
        calls.append(1)
        return None

    with registered(make_backend("counted", {"cpu": 1000}, probe=probe)):
        for _ in range(3):
            deepport.mla_decode(*inputs.args, backend="counted")
        deepport.explain("mla_decode", *inputs.args)
    assert calls == [1]


def test_verdicts_rank_by_priority_with_never_automatic_backends_last(make_backend: Callable[..., Backend]) -> None:
    sig = MLADecodeSignature(CPU, torch.bfloat16, 1, 4, 1, 64, 32, 16, False)
    with several(make_backend("minus", {"cpu": -5}), make_backend("manual"), make_backend("top", {"cpu": 50})):
        found = verdicts("mla_decode", sig)
    names = [v.backend for v in found]
    assert names[0] == "top"
    assert names.index("torch") < names.index("reference") < names.index("minus") < names.index("manual")
    assert names[-1] == "manual" and found[-1].priority is None


# ---- explain ------------------------------------------------------------------------------------------------------

def test_explain_gives_every_backends_verdict_and_names_the_chosen_one(
        inputs: Any, runs: Runs, make_backend: Callable[..., Backend]) -> None:
    with several(make_backend("page64", {"cpu": 900}, requirements=(one_of("page_block_size", {64}),)),
                 make_backend("gone", {"cpu": 950}, probe=lambda: "driver missing")):
        ex = deepport.explain("mla_decode", *inputs.args)
        registered_names = {b.name for b in all_backends()}
    by_name = {v.backend: v for v in ex.verdicts}
    assert set(by_name) == registered_names
    assert by_name["page64"].reasons == ("needs page_block_size in {64}, got page_block_size=16",)
    assert by_name["gone"].reasons == ("unavailable: driver missing",)
    assert by_name["torch"].can_run and by_name["reference"].can_run
    assert (ex.chosen, ex.source) == ("torch", "automatic")
    text = str(ex)
    assert "-> torch" in text and "chosen: torch (automatic)" in text and "cannot run: unavailable" in text
    assert runs == []  # explain runs nothing


def test_explain_reports_an_explicit_choice_that_cannot_run_instead_of_raising(
        inputs: Any, make_backend: Callable[..., Backend], monkeypatch: pytest.MonkeyPatch) -> None:
    with registered(make_backend("page64", requirements=(one_of("page_block_size", {64}),))):
        ex = deepport.explain("mla_decode", *inputs.args, backend="page64")
        assert ex.chosen is None and ex.source.startswith("BackendNotSupportedError")
        monkeypatch.setenv("DEEPPORT_BACKEND", "reference")
        ex = deepport.explain("mla_decode", *inputs.args)
        assert (ex.chosen, ex.source) == ("reference", "$DEEPPORT_BACKEND")
        with deepport.use_backend(mla_decode="torch"):
            assert deepport.explain("mla_decode", *inputs.args).source == "use_backend(mla_decode=...)"


# ---- registry -----------------------------------------------------------------------------------------------------

def test_registering_a_duplicate_name_raises_and_keeps_the_first(make_backend: Callable[..., Backend]) -> None:
    torch_backend = get("torch")
    with pytest.raises(ValueError, match="'torch' is already registered"):
        register(make_backend("torch"))
    assert get("torch") is torch_backend
    with registered(make_backend("twice")) as first:
        with pytest.raises(ValueError, match="already registered"), registered(make_backend("twice")):
            pass
        assert get("twice") is first


def test_registered_removes_the_backend_after_the_block(make_backend: Callable[..., Backend]) -> None:
    with registered(make_backend("temporary")):
        assert get("temporary").name == "temporary"
    with pytest.raises(UnknownBackendError):
        get("temporary")
    assert "temporary" not in {b.name for b in all_backends()}
