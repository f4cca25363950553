"""The reference kernels as a plugin that answers last: the fallback for any backend.

It answers for a non-reference backend only when the user allowed fallback; backends that
run the reference natively (cpu, and the GPU backends for ops without a native kernel)
return these ops themselves.
"""

from ...core.plugins.hookspecs import hookimpl


@hookimpl(trylast=True)
def ernie_hal_get_kernel(backend, op, spec):
    if not spec.allow_fallback:
        return None
    from ...kernels.reference import ops_for
    return ops_for(spec).get(op)
