"""The ``vidrank`` command line.

Every sub-command imports its module lazily: ``vidrank serve`` and ``vidrank models`` must run in
an environment without torch (the serving image), so nothing here imports torch at module level.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="vidrank: MMoE video ranking.")
models_app = typer.Typer(no_args_is_help=True, help="Inspect and operate the model registry.")
app.add_typer(models_app, name="models")

RegistryOpt = Annotated[
    Path, typer.Option("--registry", envvar="VIDRANK_REGISTRY", help="Registry directory.")
]


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Output directory for the Parquet files.")],
    impressions: Annotated[int, typer.Option(help="Number of impressions.")] = 1_000_000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    task_correlation: Annotated[
        float, typer.Option(help="0..1: how much click, completion and like share a driver.")
    ] = 0.5,
) -> None:
    """Simulate video-interaction logs (KuaiRand schema) with ground truth."""
    from model.training.simulate import run_simulate

    run_simulate(out, impressions=impressions, seed=seed, task_correlation=task_correlation)


@app.command()
def train(
    registry: RegistryOpt = Path("registry"),
    data: Annotated[
        Path | None,
        typer.Option(help="Logs in KuaiRand's schema (or data prepared for DDP ranks)."),
    ] = None,
    simulate: Annotated[
        int | None, typer.Option("--simulate", help="Train on N simulated impressions instead.")
    ] = None,
    arch: Annotated[str, typer.Option(help="mmoe or shared_bottom.")] = "mmoe",
    version: Annotated[
        str | None, typer.Option(help="Version name (default: a timestamp).")
    ] = None,
    epochs: Annotated[
        int, typer.Option(help="Maximum epochs (early stopping may end sooner).")
    ] = 3,
    seed: Annotated[
        int, typer.Option(help="Random seed (training is deterministic per seed).")
    ] = 0,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 2048,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 2e-3,
    small: Annotated[bool, typer.Option("--small", help="A tiny model config (tests).")] = False,
    loss_weights: Annotated[
        str, typer.Option(help="Per-task loss weights, e.g. 'click=1,watch_time=1,like=1'.")
    ] = "click=1,watch_time=1,like=1",
    activate: Annotated[
        bool | None,
        typer.Option(
            "--activate/--no-activate",
            help="Make the new version production (default: only when none is).",
        ),
    ] = None,
    if_empty: Annotated[
        bool, typer.Option("--if-empty", help="Do nothing when a production model exists.")
    ] = False,
    nproc: Annotated[
        int, typer.Option(help="Processes for DistributedDataParallel training (gloo).")
    ] = 1,
    quantize: Annotated[
        bool,
        typer.Option(
            "--quantize",
            help=(
                "Publish the int8 dynamically quantised graph (refused if held-out click or"
                " like AUC drops by more than 0.002)."
            ),
        ),
    ] = False,
) -> None:
    """Train an MMoE (or the shared-bottom baseline), export it to ONNX and publish the bundle.

    Under torchrun (``torchrun --nproc_per_node N -m model.cli train ...``) every process is one
    DDP rank.
    """
    from model.training.config import TrainConfig, TrainJob, parse_loss_weights
    from model.training.train import run_train

    try:  # every option is parsed and checked here, once: a bad one fails before any data is read
        config = TrainConfig(
            arch=arch,
            small=small,
            epochs=epochs,
            seed=seed,
            batch_size=batch_size,
            lr=lr,
            loss_weights=parse_loss_weights(loss_weights),
        )
        job = TrainJob(
            registry=registry,
            data=data,
            simulate=simulate,
            train=config,
            version=version,
            activate=activate,
            if_empty=if_empty,
            nproc=nproc,
            quantize=quantize,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    run_train(job)


@app.command("tune-fusion")
def tune_fusion(
    version: Annotated[str, typer.Argument(help="The version whose fusion to tune.")],
    registry: RegistryOpt = Path("registry"),
    data: Annotated[
        Path | None, typer.Option(help="Logs in KuaiRand's schema; their test split is used.")
    ] = None,
    simulate: Annotated[
        int | None,
        typer.Option("--simulate", help="Simulate N impressions (with --seed); test split used."),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the simulation, the search/report user split, TPE.")
    ] = 0,
    trials: Annotated[int, typer.Option(help="Optuna trials.")] = 100,
    profile: Annotated[
        str | None, typer.Option(help="Profile name to write (default: tuned_<version>).")
    ] = None,
    profiles: Annotated[
        Path,
        typer.Option(envvar="VIDRANK_FUSION_PROFILES", help="Profile file (TOML) to write into."),
    ] = Path("fusion_profiles.toml"),
    objective: Annotated[
        str,
        typer.Option(help="truth (simulated data), logged (real logs) or auto (truth if any)."),
    ] = "auto",
    k: Annotated[int, typer.Option("--k", help="NDCG cut-off (top k of each user's list).")] = 10,
    floor: Annotated[
        str | None,
        typer.Option(help="e.g. click=0.95: top-k click rate >= 95% of click-only ranking's."),
    ] = None,
    search_fraction: Annotated[
        float, typer.Option(help="Share of held-out users the search sees (the rest: report).")
    ] = 0.5,
) -> None:
    """Search the fusion (method, weights, watch transform) of VERSION on held-out data.

    Writes the best profile into the profile file (other profiles kept), its record with the
    version, and refreshes the version's report.
    """
    _run_tune(dict(locals()))  # the parameters are TuneJob's fields, by name


def _run_tune(options: dict[str, Any]) -> None:
    """Build the TuneJob (a bad option is a usage error, before any data is read) and run it."""
    from model.training.fusion_search import Floor
    from model.training.report import REPORT_FILE, write_report
    from model.training.tune import TuneJob, run_tune_fusion

    floor = options.pop("floor")
    try:
        job = TuneJob(**options, floor=Floor.parse(floor) if floor is not None else None)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    _check_version(job.registry, job.version)
    try:
        run_tune_fusion(job)
    except (ValueError, RuntimeError) as e:  # no truth, too little data, a floor nobody met
        _fail(str(e))
    typer.echo(f"report: {write_report(_registry(job.registry), job.version) / REPORT_FILE}")


@app.command()
def report(version: str, registry: RegistryOpt = Path("registry")) -> None:
    """Write VERSION's Markdown report with PNG plots to <registry>/reports/VERSION/."""
    from model.training.report import REPORT_FILE, write_report

    _check_version(registry, version)
    typer.echo(str(write_report(_registry(registry), version) / REPORT_FILE))


def _check_version(registry: Path, version: str) -> None:
    """Fail with a one-line error unless VERSION is a readable bundle of the registry."""
    from model.core.bundle import BundleError
    from model.core.registry import RegistryError

    try:
        _registry(registry).bundle(version)
    except (RegistryError, BundleError) as e:
        _fail(str(e))


@app.command()
def serve(
    registry: RegistryOpt = Path("registry"),
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (one per core).")] = None,
) -> None:
    """Serve POST /rank (and health, models, admin, metrics) with uvicorn."""
    from service.server import run_server
    from service.settings import Settings

    overrides: dict[str, object] = {"registry": registry}
    for key, value in (("host", host), ("port", port), ("workers", workers)):
        if value is not None:
            overrides[key] = value
    run_server(Settings(**overrides))  # type: ignore[arg-type]


def _registry(path: Path):  # type: ignore[no-untyped-def]
    from model.core.registry import Registry

    return Registry(path)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


@models_app.command("list")
def models_list(registry: RegistryOpt = Path("registry")) -> None:
    """List published versions with their aliases and headline metrics."""
    reg = _registry(registry)
    aliases = reg.read_aliases()
    canary = aliases.canary.version if aliases.canary else None
    for v in reg.versions():
        tags = [
            t for t, name in (("production", aliases.production), ("canary", canary)) if name == v
        ]
        try:
            metrics = reg.bundle(v).metrics
            summary = " ".join(
                f"{k}={metrics[k]:.4f}"
                for k in ("click_auc", "like_auc", "watch_rmse")
                if isinstance(metrics.get(k), int | float)
            )
        except Exception as e:  # a broken bundle is listed, not fatal
            summary = f"INVALID: {e}"
        typer.echo(f"{v:24s} {','.join(tags):18s} {summary}")


@models_app.command("show")
def models_show(version: str, registry: RegistryOpt = Path("registry")) -> None:
    """Print a version's manifest."""
    from model.core.bundle import BundleError
    from model.core.registry import RegistryError

    try:
        typer.echo(json.dumps(_registry(registry).bundle(version).manifest, indent=2))
    except (RegistryError, BundleError) as e:
        _fail(str(e))


def _print_aliases(aliases) -> None:  # type: ignore[no-untyped-def]
    typer.echo(json.dumps(aliases.to_dict(), indent=2))


@models_app.command("activate")
def models_activate(version: str, registry: RegistryOpt = Path("registry")) -> None:
    """Make VERSION production (verifies the bundle first); every replica converges on it."""
    from model.core.bundle import BundleError
    from model.core.registry import RegistryError

    reg = _registry(registry)
    try:
        reg.bundle(version)  # verify checksum and schema before any replica tries it
        _print_aliases(reg.activate(version))
    except (RegistryError, BundleError) as e:
        _fail(str(e))


@models_app.command("rollback")
def models_rollback(registry: RegistryOpt = Path("registry")) -> None:
    """Return production to the previously active version."""
    from model.core.registry import RegistryError

    try:
        _print_aliases(_registry(registry).rollback())
    except RegistryError as e:
        _fail(str(e))


@models_app.command("canary")
def models_canary(
    version: Annotated[
        str | None, typer.Argument(help="Canary version; omit with --clear.")
    ] = None,
    percent: Annotated[float, typer.Option(help="Percent of users (0 < p <= 100).")] = 10.0,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the canary.")] = False,
    registry: RegistryOpt = Path("registry"),
) -> None:
    """Send PERCENT of users (stable by user_id) to VERSION, or clear the canary."""
    from model.core.bundle import BundleError
    from model.core.registry import RegistryError

    reg = _registry(registry)
    try:
        if clear:
            _print_aliases(reg.clear_canary())
        elif version is None:
            _fail("give a VERSION or --clear")
        else:
            reg.bundle(version)
            _print_aliases(reg.set_canary(version, percent))
    except (RegistryError, BundleError, ValueError) as e:
        _fail(str(e))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
