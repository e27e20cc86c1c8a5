"""pvio.bench: benchmarks, not tests.  `harness/` is what every benchmark shares (the
registry, the runner, figures, the report, plots, profiling, fio); each other module is
one layer, named as the layer, with its ``SUITE`` and its `pvio bench <layer>` subcommand.
Figures are medians of several runs with min and max, and timings that compare pvio with
a baseline are measured in the same run and reported as ratios."""
