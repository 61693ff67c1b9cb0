"""help() shows a useful text for every public name: each class, function, method, property, result code and
flag has a docstring of its own, and test-only hooks stay out of the public signatures."""
from __future__ import annotations

import enum
import inspect
import pydoc

import pytest

import ledger

PUBLIC_CLASSES = [name for name in ledger.__all__ if inspect.isclass(getattr(ledger, name))]
PUBLIC_CALLABLES = [name for name in ledger.__all__
                    if callable(getattr(ledger, name)) and not inspect.isclass(getattr(ledger, name))]
ENUMS = [name for name in PUBLIC_CLASSES if issubclass(getattr(ledger, name), enum.Enum)]


def own_doc(obj: object) -> str:
    return inspect.cleandoc(getattr(obj, "__doc__", None) or "")


def test_the_lists_are_not_empty():
    assert len(PUBLIC_CLASSES) > 20 and len(PUBLIC_CALLABLES) > 5 and len(ENUMS) >= 6


@pytest.mark.parametrize("name", PUBLIC_CLASSES + PUBLIC_CALLABLES)
def test_every_public_name_has_its_own_docstring(name):
    obj = getattr(ledger, name)
    if inspect.isclass(obj):
        assert "__doc__" in vars(obj) and own_doc(obj), f"ledger.{name} has no docstring of its own"
        # A dataclass without one gets its signature as __doc__: that is not a description.
        assert not own_doc(obj).startswith(f"{name}("), f"ledger.{name}: {own_doc(obj)[:60]!r}"
    else:
        assert own_doc(obj), f"ledger.{name} has no docstring"
    assert name in pydoc.render_doc(obj, renderer=pydoc.plaintext)


def public_members(cls: type) -> list[tuple[str, object]]:
    """The methods and properties `cls` defines itself (not inherited), enum members and private names left out."""
    members = []
    for attribute, value in vars(cls).items():
        if attribute.startswith("_") or (issubclass(cls, enum.Enum) and attribute in cls.__members__):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property) or inspect.isroutine(value):
            members.append((attribute, value))
    return members


@pytest.mark.parametrize("name", [name for name in PUBLIC_CLASSES if public_members(getattr(ledger, name))])
def test_every_public_method_and_property_has_a_docstring(name):
    missing = [attribute for attribute, value in public_members(getattr(ledger, name)) if not own_doc(value)]
    assert not missing, f"ledger.{name}: no docstring on {missing}"


@pytest.mark.parametrize("name", ENUMS)
def test_every_result_code_and_flag_is_described(name):
    cls = getattr(ledger, name)
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    for member in cls:
        description = member.__doc__
        assert description and description != cls.__doc__, f"{name}.{member.name} has no description"
        assert f"{member.name} = {member.value}: {description}" in text, f"help({name}) does not list {member.name}"


def test_help_of_transfer_describes_its_arguments():
    with ledger.open(None) as handle:
        for transfer in (ledger.Ledger.transfer, handle.transfer):   # the class's, and the core's bound per handle
            text = pydoc.render_doc(transfer, renderer=pydoc.plaintext)
            for argument in ("id", "debit_account", "credit_account", "amount", "ledger", "code", "flags",
                             "pending_id", "timeout", "user_data"):
                assert f"{argument}:" in text, (argument, text)
            assert "idempotency" in text and "_ZERO" not in text and "_ONE" not in text
        core = [(p.name, p.kind, p.default) for p in inspect.signature(handle.transfer).parameters.values()]
        face = [(p.name, p.kind, p.default) for p in inspect.signature(ledger.Ledger.transfer).parameters.values()]
        assert core == face[1:]


def test_the_test_only_hook_is_not_in_the_public_signature_of_open():
    assert "fault_injector" not in inspect.signature(ledger.open).parameters
    assert "fault_injector" not in pydoc.render_doc(ledger.open, renderer=pydoc.plaintext)
    with pytest.raises(TypeError):
        ledger.open(None, fault_injector=print)  # type: ignore[call-arg]
