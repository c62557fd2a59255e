"""`eqr info`: a model's architecture, config, parameters, FLOPs per outer step and provenance."""
from __future__ import annotations

import json

import click

from eqr.commands.options import json_option


@click.command()
@click.argument("model")
@click.option("--weights", type=click.Choice(["ema", "model"]), default="ema", show_default=True,
              help="Which weights to use when the checkpoint has both.")
@json_option()
def info(model: str, weights: str, as_json: bool) -> None:
    """Describe MODEL: architecture, config, parameters, FLOPs per outer step, provenance.

    MODEL is an eqr checkpoint, an official EqR checkpoint (.pth), a bundled model name or a
    preset (paper-sudoku, paper-maze: fresh initialisation).

    \b
    Examples:
      eqr info paper-sudoku
      eqr info downloaded_checkpoints/sudoku-extreme/eqr.pth --weights model
      eqr info my-run/last.pt --json
    """
    from eqr.model.load import load_model, model_summary

    summary = model_summary(load_model(model, weights=weights))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    source = summary["source"]
    weights_line = source["weights"] + (f" ({source['note']})" if source["note"] else "")
    lines = [
        f"model         {summary['architecture']}",
        f"source        {source['description']}" + (f" sha256 {source['sha256'][:16]}" if source["sha256"] else ""),
        f"weights       {weights_line}",
        f"parameters    {summary['parameters']:,}",
        f"FLOPs/step    {summary['flops_per_outer_step_per_sample'] / 1e9:.3f} GFLOPs per sample "
        f"({summary['blocks_per_outer_step']} block applications)",
        "config",
    ]
    lines += [f"  {key:<22}{value}" for key, value in summary["config"].items()]
    click.echo("\n".join(lines))
