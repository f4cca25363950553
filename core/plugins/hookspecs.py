"""pluggy hook specifications for ernie-hal backends: signatures and docstrings only.

Hooks bind at load time (registry, KernelTable); nothing here is called per token.
Implementations may accept fewer arguments than a spec (pluggy passes by name).
"""

import pluggy

PROJECT = "ernie_hal"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---- discovery -----------------------------------------------------------------------------
@hookspec
def ernie_hal_register_backends():
    """Return a list of :class:`ernie_hal.core.plugins.backend.BackendSpec` this plugin provides.

    Collect-all: every plugin's lists are concatenated. Built-in backends (cpu, cuda, rocm,
    ixuca) register through this hook exactly like third-party plugins, which load from the
    entry-point group ``ernie_hal.backends``. Returning None or [] registers nothing.
    """


# ---- kernel binding (once per model load) --------------------------------------------------
@hookspec(firstresult=True)
def ernie_hal_get_kernel(backend, op, spec):
    """Return a callable implementing ``op`` on ``backend`` for ``spec``, or None to pass.

    firstresult: stops at the first non-None result. ``op`` is one of the names in
    ``ernie_hal.core.plugins.kernel_table.OPS``; ``spec`` is an :class:`ernie_hal.core.plugins.kernel_table.OpSpec`
    (dtype and shape facts). The reference plugin answers last (trylast) with the
    pure-torch ops, so an op is always bound unless fallback is disallowed.
    """


@hookspec
def ernie_hal_explain(backend, op, spec):
    """Return a reason (str) why ``backend`` cannot run ``op`` for ``spec`` natively, or None.

    Collect-all: reasons from every plugin are listed in errors, in `ernie-hal devices`,
    and as the skip reasons of the conformance matrix.
    """
