"""Several LoRA/DoRA adapters on one frozen base model (issue 18).

- :mod:`.store`       adapters stacked per layer ([n, r_max, K] / [n, N, r_max]), a cache rebuilt
                      only when an adapter's tensors change (version counters)
- :mod:`.plan`        rows grouped by adapter for one kernel launch (no host sync)
- :mod:`.functional`  ``multi_adapter_linear``: mixed batches and several active adapters;
                      torch path (differentiable) and kernel path (one shrink + one expand launch)
- :mod:`.reference`   the oracles (single-adapter references applied per adapter / per row)
- :mod:`.glue`        models: ``adapter_names=`` on forward and generate, several active adapters
- :mod:`.bench`       the multi-adapter benchmark
See docs/multi-adapter.md.
"""
from .functional import multi_adapter_linear, resolve_multi_backend
from .glue import (BASE_ADAPTER, adapter_names_context, enable_adapter_names, layer_specs, set_active_adapters)
from .store import AdapterSpec

__all__ = ["AdapterSpec", "BASE_ADAPTER", "adapter_names_context", "enable_adapter_names", "layer_specs",
           "multi_adapter_linear", "resolve_multi_backend", "set_active_adapters"]
