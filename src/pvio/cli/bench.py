"""`pvio bench`: one subcommand per layer; with no subcommand, the whole suite."""

from __future__ import annotations

from pathlib import Path

import click

from pvio.bench.harness.registry import LAYERS, MATRIX
from pvio.cli.lazy import LazyGroup

#: name -> ("module:command", one-line help): the layers that have a subcommand, named as
#: the layer (the registry's table is the one list of layers).
BENCHMARKS: dict[str, tuple[str, str]] = {
    name: (f"{layer.module}:{name}", layer.help) for name, layer in LAYERS.items() if layer.help
}


@click.group(cls=LazyGroup, lazy=BENCHMARKS, invoke_without_command=True)
@click.option("--quick", is_flag=True,
              help="A smoke run of every layer (about a minute on 2 cores) instead of the "
                   "full matrix.")
@click.option("--only", metavar="NAMES",
              help=f"Comma-separated benchmarks to run, of {','.join(MATRIX)}; default: all.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Directory for results.json and the plots [default: "
                   "./bench-results/<timestamp>].")
@click.option("--profile", is_flag=True,
              help="Record where the time goes in pvio's processes (py-spy, else cProfile) "
                   "into OUT/profile/.")
@click.pass_context
def bench(ctx: click.Context, quick: bool, only: str | None, out: Path | None,
          profile: bool) -> None:
    """Benchmarks: pvio next to what users would pick instead, as ratios in one run.

    With no subcommand, runs every layer's benchmark (the full matrix, or --quick),
    prints one table and writes results.json and PNG plots into --out.
    """
    if ctx.invoked_subcommand is not None:
        if quick or only or out or profile:
            raise click.UsageError("--quick, --only, --out and --profile are for the whole "
                                   "suite (`pvio bench`); give a subcommand its own options")
        return
    from pvio.bench.harness import report

    try:
        names = report.resolve_names(only)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--only") from None
    out = out.resolve() if out is not None else report.default_out_dir()
    argv = ["pvio", "bench", *(["--quick"] if quick else []),
            *(["--only", only] if only else []), "--out", str(out),
            *(["--profile"] if profile else [])]
    result = report.run(names, "quick" if quick else "full", out, profile, argv)
    if any(r.status == "failed" for r in result.results):
        ctx.exit(1)
