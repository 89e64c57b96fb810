"""Every exception class of the project survives pickling (Ray pickles exceptions between processes:
one that does not comes back as a TypeError about its constructor instead of the real cause)."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil

import fourdthinker


def _project_exceptions() -> list[type[BaseException]]:
    for module in pkgutil.walk_packages(fourdthinker.__path__, prefix="fourdthinker."):
        if not module.name.endswith("__main__"):  # running the CLI is not importing it
            importlib.import_module(module.name)
    found, todo = set(), [BaseException]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.split(".")[0] == "fourdthinker":
                found.add(sub)
    return sorted(found, key=lambda c: (c.__module__, c.__qualname__))


def _instance(cls: type[BaseException]) -> BaseException:
    """An instance with a distinct string for every constructor parameter (each field then differs)."""
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not params:  # BaseException's own (*args) constructor
        return cls(f"{cls.__name__} message")
    return cls(*(f"<{cls.__name__}.{p.name}>" for p in params))


def test_the_walk_finds_the_project_exceptions():
    names = {c.__name__ for c in _project_exceptions()}
    assert {"UsageError", "ConfigError", "FrameLoadError", "PathOutsideRoot", "StageError", "ClipDropped",
            "InvalidPoses"} <= names


def test_every_project_exception_pickles_with_its_message_and_fields():
    for cls in _project_exceptions():
        err = _instance(cls)
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is cls
        assert str(back) == str(err), cls
        assert vars(back) == vars(err), cls
