"""Name -> builder registries: the config picks a component by name, the registry builds it."""
from __future__ import annotations

from typing import Any, Callable, Dict, List


class UnknownChoiceError(ValueError):
    """An unknown component name; the message lists the known ones."""


class Registry:
    """Maps names to builders (classes or functions) for one kind of component."""

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._builders[name] = builder
            return builder

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._builders:
            raise UnknownChoiceError(f"unknown {self.kind} '{name}'; known: {', '.join(self.names())}")
        return self._builders[name]

    def build(self, choice: str, /, **params: Any) -> Any:
        return self.get(choice)(**params)

    def names(self) -> List[str]:
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders


SCHEDULES = Registry("schedule")
OBJECTIVES = Registry("objective")
SAMPLERS = Registry("sampler")
GRIDS = Registry("grid")
MODELS = Registry("model")
DATASETS = Registry("dataset")
LOGGERS = Registry("logger")
LR_SCHEDULES = Registry("lr schedule")
LATENT_SPACES = Registry("latent space")
EMAS = Registry("ema")
