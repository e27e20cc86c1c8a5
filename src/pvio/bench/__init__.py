"""pvio.bench: benchmarks, not tests.  Each layer has a subcommand of `pvio bench`;
figures are medians of several runs with min and max, and timings that compare pvio with
a baseline are measured in the same run and reported as ratios."""
