"""Suite adapters for layers whose benchmark module does not define ``SUITE`` itself.

`pvio.bench.suite.load_benchmark` looks here when a layer's module (the one named in
`pvio.bench.cli.BENCHMARKS`) has no ``SUITE``.  An adapter calls the layer's own
measuring functions and turns their numbers into figures; it never re-implements a
measurement.  When a layer adds its own ``SUITE``, its adapter here is simply no longer
used (and should be deleted).
"""

from __future__ import annotations

from pvio.bench.suite import Benchmark

#: layer name -> adapter.
ADAPTERS: dict[str, Benchmark] = {}
