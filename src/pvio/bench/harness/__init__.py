"""The benchmark harness: what every layer's benchmark shares, and nothing of any layer.

Theory of operation
-------------------
`pvio bench` runs the layers named in `registry.LAYERS`, in the order the data flows
(ring, hypervisor, xenstore, blk, nbd, lguest).  Each layer's module (``pvio.bench.<layer>``)
defines ``SUITE``, a `benchmark.Benchmark`; the registry imports it by name when it is
about to run, so no harness module imports a layer.  `runner.run_suite` runs each in
turn with a time limit and turns its `figures.Figure`\\ s (pvio next to baselines of the
same run; ratio = pvio / baseline) into a `runner.SuiteReport`; `report` draws the
progress and the table and writes results.json, results.md and the `plots`; `profile`
records where the time went (``--profile``).  `fio` is the block layers' shared tool:
fio's nbd engine against an NBD server, qemu-nbd beside it, and the block matrix.

How to add a benchmark
----------------------
1. Write ``src/pvio/bench/<layer>.py`` and add its line to `registry.LAYERS` (with a help
   line if it has a click command named as the layer: ``pvio bench <layer>`` then works).
2. In the module, measure and define::

       def _suite(params: Params, ctx: Context) -> list[Figure]:
           samples = interleave(params["runs"], {
               "pvio": lambda: measure_pvio(params["n"]),
               "socket echo": lambda: measure_echo(params["n"]),
           })
           return [compare("read", "µs", samples, higher_is_better=False)]

       SUITE = Benchmark(
           name="<layer>", title="...", run=_suite,
           quick={"runs": 3, "n": 1000}, full={"runs": 5, "n": 20000},
           tools=("fio",),            # external tools it runs: absent -> skipped
           needs_root=False,          # namespaces, TAP... -> skipped when not root
       )

   Record the exact argv of every external program with ``ctx.command(argv)`` (it
   returns the argv, to pass on to subprocess), report sub-steps with
   ``ctx.progress("...")``, put temporary files in ``ctx.workdir`` (absolute; UNIX
   sockets, limited to 107 bytes, go in a short directory of their own under /tmp) and
   anything that is not a figure but worth keeping (per-request counters, settings) in
   ``ctx.extra``.  A ``"timeout_s"`` entry in the parameters overrides the time limit
   (`runner.TIMEOUT_S`: 150 s quick, 900 s full), past which the benchmark fails with
   BenchmarkTimeout.  Processes the benchmark leaves running are stopped afterwards and
   listed in its ``extra`` as a defect to fix.
3. The quick parameter set is a smoke run: the whole ``pvio bench --quick`` stays under
   about a minute on two cores (a test runs it), so budget a few seconds per layer and
   about 15 for the block layers, which start servers and run fio.  The full set should
   keep the whole run under fifteen minutes.

Deliberately not here: no figure is ever asserted by a test (tests only check that the
suite runs and writes files that read back), no warm-up policy is imposed (each
benchmark knows its own), and benchmarks run one after another, never in parallel.
Alternatives rejected: pytest-benchmark / asv (they time functions in one process;
pvio's figures need daemons, external tools and baselines run side by side) and a JSON
Schema (the dataclasses that write results.json are its one declaration; see `jsondoc`).
"""
