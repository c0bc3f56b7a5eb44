"""Filling a ``torch.nn.Module``'s own parameters and buffers in place: :func:`load_module`.

Serving frameworks build the module first (often on the meta device, then
``to_empty``) and need its tensors filled without a second copy of the
weights. :class:`ModuleTarget` is a :class:`~mx_orchestrator.target.Target`
over the module's own storage; which checkpoint tensor fills which module
tensor is decided per source manifest by the pure :func:`bind`, when the
peer attempt's check asks the target for its manifest, so everything below
is settled before any byte moves:

* **names**: checkpoint name -> module name through ``rename`` (a mapping or a
  callable; a name it maps to ``None`` or leaves out is not used); by default
  the identity, or the one prefix difference (``model.``, ``bert.``, ...) that
  matches the most names, found by :func:`default_rename`. Two checkpoint
  names that land on one module tensor are an error naming both.
* **tied parameters** (one storage under several module names) are filled
  once; the other names are reported as ``tied``.
* **buffers** are filled when the checkpoint holds them (after ``to_empty`` a
  buffer holds garbage, non-persistent ones included); module tensors no
  checkpoint tensor fills are ``module_only``, checkpoint tensors the module
  lacks ``checkpoint_only``; with ``strict`` a module *parameter* the
  checkpoint lacks is a ``ManifestMismatch`` naming it.
* a **dtype or shape** difference is a ``ManifestMismatch`` naming the tensor:
  never a silent cast.

Every tensor is filled in its own storage: after the load each parameter's
``data_ptr()`` is the one it had before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from .buffers import Buffers, wrap
from .errors import ConfigError
from .layout import LayoutSpec
from .models import Manifest, ModelIdentity, dtype_name
from .registry import open_registry
from .registry.base import SourceRegistry
from .report import LoadReport
from .target import Target, TargetMismatch

if TYPE_CHECKING:
    import torch

    from .pipeline import Orchestrator
    from .strategy import Strategy

__all__ = [
    "ModuleBinding",
    "ModuleTarget",
    "Rename",
    "bind",
    "default_rename",
    "load_module",
    "load_module_sync",
]

#: checkpoint name -> module name (``None``: not used)
Rename = Mapping[str, str] | Callable[[str], str | None]


@dataclass(frozen=True)
class ModuleBinding:
    """Which module tensor each checkpoint tensor fills, and what is left over on either side."""

    #: checkpoint name -> module name it fills
    names: dict[str, str]
    #: module name filled -> the other module names sharing its storage (filled with it)
    tied: dict[str, list[str]] = field(default_factory=dict)
    #: module tensors no checkpoint tensor fills (buffers here keep whatever they held)
    module_only: list[str] = field(default_factory=list)
    #: checkpoint tensors the module does not have
    checkpoint_only: list[str] = field(default_factory=list)
    #: checkpoint name read -> other checkpoint names of the same (tied) module storage, not read
    duplicates: dict[str, list[str]] = field(default_factory=dict)
    #: how names were mapped (the default's choice, or "rename")
    rename: str = "identity"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rename": self.rename,
            "filled": len(self.names),
            "tied": self.tied,
            "module_only": self.module_only,
            "checkpoint_only": self.checkpoint_only,
            "duplicates": self.duplicates,
        }


def default_rename(
    checkpoint: Sequence[str], module: Iterable[str]
) -> tuple[Callable[[str], str | None], str]:
    """The identity, or the single prefix added or stripped that maps the most checkpoint names.

    Candidates are the identity and, for each first dotted component ``p.``
    seen on either side, stripping it from checkpoint names or adding it; the
    identity wins ties. Returns the mapping and its description.
    """
    names = set(module)
    prefixes = {n.split(".", 1)[0] + "." for n in (*checkpoint, *names) if "." in n}

    def strip(p: str) -> Callable[[str], str | None]:
        return lambda c: c[len(p) :] if c.startswith(p) else c

    def add(p: str) -> Callable[[str], str | None]:
        return lambda c: p + c

    candidates: list[tuple[str, Callable[[str], str | None]]] = [("identity", lambda c: c)]
    for p in sorted(prefixes):
        candidates += [(f"strip {p!r}", strip(p)), (f"add {p!r}", add(p))]

    def score(mapping: Callable[[str], str | None]) -> int:
        return sum(1 for c in checkpoint if mapping(c) in names)

    best_name, best = max(candidates, key=lambda nc: (score(nc[1]), nc[0] == "identity"))
    return best, best_name


def bind(
    module_tensors: Mapping[str, torch.Tensor],
    parameters: Iterable[str],
    source: Manifest,
    *,
    rename: Rename | None = None,
    strict: bool = True,
) -> tuple[ModuleBinding, dict[str, torch.Tensor]]:
    """Match ``source``'s tensors to the module's; the binding and ``{checkpoint name: module tensor}``.

    Pure (reads only shapes, dtypes and storage addresses). Raises
    :class:`~mx_orchestrator.target.TargetMismatch` naming the tensor when a
    dtype or shape differs, when two checkpoint names land on one module
    tensor, or (``strict``) when a parameter has no checkpoint tensor.
    """
    # one storage, several names (tied weights): the first name stands for all of them
    canonical: dict[str, str] = {}
    by_storage: dict[tuple[int, int, str, tuple[int, ...]], str] = {}
    aliases: dict[str, list[str]] = {}
    for name, tensor in module_tensors.items():
        key = (
            tensor.data_ptr(),
            tensor.numel() * tensor.element_size(),
            str(tensor.dtype),
            tuple(tensor.shape),
        )
        first = by_storage.setdefault(key, name) if tensor.numel() else name
        canonical[name] = first
        if first != name:
            aliases.setdefault(first, []).append(name)
    checkpoint = [spec.name for spec in source.tensors]
    if rename is None:
        mapping, how = default_rename(checkpoint, module_tensors)
    elif callable(rename):
        mapping, how = rename, "rename"
    else:
        table = dict(rename)
        mapping, how = table.get, "rename"
    specs = source.by_name()
    names: dict[str, str] = {}
    claimed: dict[str, str] = {}  # module name -> the checkpoint name mapped onto it
    filled_by: dict[str, str] = {}  # storage (its first module name) -> checkpoint name filling it
    duplicates: dict[str, list[str]] = {}
    checkpoint_only: list[str] = []
    for c in checkpoint:
        m = mapping(c)
        if m is None or m not in module_tensors:
            checkpoint_only.append(c)
            continue
        if m in claimed:
            raise TargetMismatch(f"checkpoint tensors {claimed[m]!r} and {c!r} both map to module {m!r}")
        claimed[m] = c
        tensor, spec = module_tensors[m], specs[c]
        if (dtype_name(tensor.dtype), tuple(tensor.shape)) != (spec.dtype, spec.shape):
            raise TargetMismatch(
                f"tensor {c!r} (module {m!r}): checkpoint {spec.dtype}{list(spec.shape)}, "
                f"module {dtype_name(tensor.dtype)}{list(tensor.shape)}; no silent casts"
            )
        root = canonical[m]
        if root in filled_by:  # a tied storage the checkpoint holds twice: filled once
            duplicates.setdefault(filled_by[root], []).append(c)
            continue
        filled_by[root] = c
        names[c] = m
    parameter_names = set(parameters)
    filled_roots = set(filled_by)
    module_only = sorted(n for n in module_tensors if canonical[n] not in filled_roots)
    missing = [n for n in module_only if n in parameter_names]
    if strict and missing:
        raise TargetMismatch(
            f"the checkpoint lacks {len(missing)} module parameters, e.g. {missing[:3]} (strict)"
        )
    tied: dict[str, list[str]] = {}
    for m in names.values():
        root = canonical[m]
        group = [root, *aliases.get(root, [])]
        if len(group) > 1:
            tied[m] = sorted(n for n in group if n != m)
    binding = ModuleBinding(names, tied, module_only, checkpoint_only, duplicates, how)
    return binding, {c: module_tensors[m] for c, m in names.items()}


class ModuleTarget(Target):
    """A target whose memory is a module's own parameters and buffers (see the module docstring)."""

    def __init__(
        self,
        module: torch.nn.Module,
        identity: ModelIdentity,
        *,
        rename: Rename | None = None,
        strict: bool = True,
        verify: bool = True,
    ) -> None:
        tensors: dict[str, torch.Tensor] = {}
        parameters: list[str] = []
        for name, param in module.named_parameters(remove_duplicate=False):
            tensors[name] = param.data
            parameters.append(name)
        for name, buffer in module.named_buffers(remove_duplicate=False):
            tensors[name] = buffer
        if not tensors:
            raise ConfigError("the module has no parameters or buffers to fill")
        devices = {t.device for t in tensors.values()}
        if any(d.type == "meta" for d in devices):
            raise ConfigError(
                "the module has tensors on the meta device: call module.to_empty(device=...) first"
            )
        if len(devices) != 1:
            raise ConfigError(f"the module's tensors span several devices: {sorted(map(str, devices))}")
        for name, tensor in tensors.items():
            try:
                dtype_name(tensor.dtype)
            except ConfigError as exc:
                raise ConfigError(f"module tensor {name!r}: {exc}") from None
        super().__init__(LayoutSpec("tensor"), str(devices.pop()), verify=verify, prefault=False)
        self.identity = identity
        self.module_tensors = tensors
        self.parameter_names = tuple(parameters)
        self.rename = rename
        self.strict = strict
        #: the binding of the manifest the target was prepared for (``None`` before)
        self.binding: ModuleBinding | None = None
        self._planned: dict[str, tuple[Buffers, ModuleBinding]] = {}

    def plan_for(self, source: Manifest) -> Manifest:
        binding, tensors = bind(
            self.module_tensors, self.parameter_names, source, rename=self.rename, strict=self.strict
        )
        if not tensors:
            raise TargetMismatch("no checkpoint tensor matches a module tensor")
        try:
            buffers = wrap(self.identity, tensors)
        except ConfigError as exc:  # e.g. a non-contiguous parameter: it cannot be filled in place
            raise TargetMismatch(f"the module cannot take this checkpoint in place: {exc}") from None
        key = buffers.manifest.manifest_fingerprint
        if self._buffers is not None:
            if self._buffers.manifest.manifest_fingerprint != key:
                raise TargetMismatch(
                    "this source's tensors bind to other module tensors than the first source's"
                )
            return self._buffers.manifest
        self._planned[key] = (buffers, binding)
        return buffers.manifest

    def prepare(self, planned: Manifest) -> Buffers:
        if self._buffers is None:
            buffers, binding = self._planned[planned.manifest_fingerprint]
            self._buffers, self.binding = buffers, binding
            self._planned.clear()
        return self._buffers

    def release(self) -> None:
        """Forget the binding (the next source binds anew); the module keeps its memory."""
        self._buffers = None
        self.binding = None


def _default_strategies(device: str) -> list[Strategy]:
    from .strategy import load_strategy

    names = (["cuda_ipc"] if device.startswith("cuda") else []) + ["rdma_region", "rdma_tensor"]
    return [load_strategy(name) for name in names]


async def load_module(
    module: torch.nn.Module,
    model_id: str | ModelIdentity,
    *,
    registry: str | SourceRegistry | None = None,
    strategies: Sequence[Strategy] | None = None,
    rename: Rename | None = None,
    strict: bool = True,
    verify: bool = True,
    revision: str = "main",
    orchestrator: Orchestrator | None = None,
    **orchestrator_options: Any,
) -> LoadReport:
    """Fill ``module``'s parameters and buffers in place from the best source; the load's report.

    ``registry``: a URL (opened and closed here) or a registry object (left
    open). ``strategies``: default ``cuda_ipc`` (CUDA modules), ``rdma_region``,
    ``rdma_tensor``. Everything else (``stripe``, ``expect``, timeouts, ...)
    goes to the :class:`~mx_orchestrator.pipeline.Orchestrator`. The report's
    ``module`` entry is the binding: what was filled, tied, left over.

    ``orchestrator``: load with this open one instead (its registry, strategies
    and options). With ``Orchestrator(..., republish=True)`` the module's own
    weights are served to peers from its first landed part, for as long as the
    orchestrator is open::

        async with Orchestrator(registry, strategies, republish=True) as orchestrator:
            await load_module(model, "org/model", orchestrator=orchestrator)
            await serve_requests()
    """
    from .pipeline import Orchestrator

    identity = model_id if isinstance(model_id, ModelIdentity) else ModelIdentity(model_id, revision)
    target = ModuleTarget(module, identity, rename=rename, strict=strict, verify=verify)
    if orchestrator is not None:
        if registry is not None or strategies is not None or orchestrator_options:
            raise ConfigError(
                "with orchestrator=, the registry, strategies and options are the orchestrator's"
            )
        report = await orchestrator.load(identity, target)
    else:
        if orchestrator_options.get("republish"):
            raise ConfigError(
                "load_module(republish=True) would stop serving as it returns: pass orchestrator= "
                "an open `async with Orchestrator(..., republish=True)`"
            )
        chosen = list(strategies) if strategies is not None else _default_strategies(target.device)
        opened = open_registry(registry) if isinstance(registry, str) else None
        try:
            async with Orchestrator(opened or registry, chosen, **orchestrator_options) as own:  # type: ignore[arg-type]
                report = await own.load(identity, target)
        finally:
            if opened is not None:
                with anyio.CancelScope(shield=True):
                    await opened.aclose()
    report.module = target.binding.to_dict() if target.binding is not None else None
    return report


def load_module_sync(module: torch.nn.Module, model_id: str | ModelIdentity, **options: Any) -> LoadReport:
    """:func:`load_module` for scripts without an event loop."""

    async def run() -> LoadReport:
        return await load_module(module, model_id, **options)

    return anyio.run(run)
