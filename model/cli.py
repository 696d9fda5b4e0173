"""The ``vidrank`` command line.

Every sub-command imports its module lazily: ``vidrank serve`` and ``vidrank models`` must run in
an environment without torch (the serving image), so nothing here imports torch at module level.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from model.core.errors import VidrankError


def _fail(message: str) -> NoReturn:
    """One line on stderr (``error: ...``) and exit code 1."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code=1)


class _Commands(TyperGroup):
    """Every command runs under this group: a domain error becomes ``_fail``'s one line, the one
    place that turns a ``VidrankError`` into a message and an exit code."""

    def invoke(self, ctx: Any) -> Any:  # typer's own (vendored) click Context
        try:
            return super().invoke(ctx)
        except VidrankError as e:
            _fail(str(e))


app = typer.Typer(
    cls=_Commands, add_completion=False, no_args_is_help=True, help="vidrank: MMoE video ranking."
)
models_app = typer.Typer(no_args_is_help=True, help="Inspect and operate the model registry.")
app.add_typer(models_app, name="models")
features_app = typer.Typer(
    no_args_is_help=True,
    help="Publish and operate feature snapshots (embedded in the registry, or in Redis).",
)
app.add_typer(features_app, name="features")

RegistryOpt = Annotated[
    Path, typer.Option("--registry", envvar="VIDRANK_REGISTRY", help="Registry directory.")
]
ReasonOpt = Annotated[
    str | None, typer.Option(help="Why; recorded in the registry's history.jsonl.")
]
ACTOR = "cli"  # the history's actor for changes made from the command line
RedisOpt = Annotated[
    str | None,
    typer.Option(
        "--redis",
        help="Redis URL (redis://host:port/db): the Redis store instead of the registry's.",
    ),
]


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Output directory for the Parquet files.")],
    impressions: Annotated[int, typer.Option(help="Number of impressions.")] = 1_000_000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    preset: Annotated[
        str,
        typer.Option(
            help="Named world: default, identical, related, unrelated or conflicting "
            "(docs/internals.md, 'Simulator knobs')."
        ),
    ] = "default",
    task_correlation: Annotated[
        float | None,
        typer.Option(
            help="-1..1: how much click, completion and like share a driver (< 0: click "
            "conflicts with the others); default: the preset's (0.5 for default)."
        ),
    ] = None,
    part_rows: Annotated[
        int,
        typer.Option(
            help="Longer logs are written in Parquet parts of this many impressions (bounded"
            " memory; `train --data` streams them)."
        ),
    ] = 2_000_000,
) -> None:
    """Simulate video-interaction logs (KuaiRand schema) with ground truth."""
    from model.simulator.world import run_simulate

    try:
        run_simulate(
            out,
            impressions=impressions,
            seed=seed,
            task_correlation=task_correlation,
            preset=preset,
            part_rows=part_rows,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


@app.command()
def prepare(
    data: Annotated[Path, typer.Option(help="Logs in KuaiRand's schema (as for `train`).")],
    out: Annotated[Path, typer.Option(help="Directory for the prepared data (e.g. shared).")],
    shards: Annotated[int, typer.Option(help="Training shards: the ranks' count, or a multiple.")],
) -> None:
    """Split, fit and shard training logs once for DDP ranks on several nodes: every node then
    runs ``torchrun ... -m model.cli train --data OUT`` (Parquet logs are streamed)."""
    from model.training.prepared import prepare_logs

    try:
        data_ready = prepare_logs(data, out, shards)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    rows = ", ".join(f"{split} {n:,}" for split, n in data_ready.rows.items())
    print(f"prepared {out}: {rows} rows; {shards} training shards ({data_ready.layout})")


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
    preset: Annotated[
        str, typer.Option(help="The simulator preset --simulate draws from (see `simulate`).")
    ] = "default",
    arch: Annotated[
        str, typer.Option(help="single_task, shared_bottom, omoe, mmoe, ple or stem.")
    ] = "mmoe",
    version: Annotated[
        str | None, typer.Option(help="Version name (default: a timestamp).")
    ] = None,
    interactions: Annotated[
        str,
        typer.Option(
            help="User x item interaction layer: any of dots,bilinear,first_order, or 'none'."
        ),
    ] = "dots,bilinear,first_order",
    interaction_dim: Annotated[
        int, typer.Option(help="Width of the interaction layer's field embeddings.")
    ] = 32,
    epochs: Annotated[
        int, typer.Option(help="Maximum epochs (early stopping may end sooner).")
    ] = 3,
    seed: Annotated[
        int, typer.Option(help="Random seed (training is deterministic per seed).")
    ] = 0,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 2048,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 2e-3,
    small: Annotated[bool, typer.Option("--small", help="A tiny model config (tests).")] = False,
    sparse: Annotated[
        bool | None,
        typer.Option(
            "--sparse/--dense",
            help="Id tables: row-wise gradients and Adam over the rows in use (the same result"
            " as dense Adam), or dense gradients and Adam over whole tables (default: row-wise"
            " in one process, dense with --nproc or torchrun).",
        ),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            help="Training forward pass: fp32, bf16 (autocast), or auto (bf16 where the CPU "
            "has bf16 kernels, else fp32)."
        ),
    ] = "auto",
    compile_: Annotated[
        str,
        typer.Option(
            "--compile", help="torch.compile the dense layers: on, off, auto (long runs)."
        ),
    ] = "off",
    id_l2: Annotated[
        float,
        typer.Option(
            help="L2 weight on the id-table rows each training impression looks up (0: none)."
        ),
    ] = 0.0,
    loss_weights: Annotated[
        str,
        typer.Option(
            help="Per-task loss weights, e.g. 'click=1,watch_time=1,like=1'; tasks not named"
            " weigh 1 (default: the architecture's; omoe, mmoe, ple, stem: click=4; others: 1)."
        ),
    ] = "",
    loss_balance: Annotated[
        str | None,
        typer.Option(
            help="How task losses combine: fixed (the weights), uncertainty or gradnorm"
            " (default: the architecture's; omoe, mmoe, ple, stem: gradnorm; others: fixed)."
        ),
    ] = None,
    gate_temperature: Annotated[
        float | None,
        typer.Option(
            help="Softmax temperature of the gates, < 1 sharper"
            " (default: the mixtures 0.1; others 1)."
        ),
    ] = None,
    gate_dropout: Annotated[
        float,
        typer.Option(help="Probability an expert is dropped from a gate's mixture in training."),
    ] = 0.1,
    experts: Annotated[
        int | None,
        typer.Option(help="OMoE's and MMoE's number of experts (default 8).", min=1),
    ] = None,
    shared_lr: Annotated[
        float | None,
        typer.Option(
            help="Learning-rate multiple of the parameters every task shares (default:"
            " the mixtures sqrt(3); others 1)."
        ),
    ] = None,
    interaction_lr: Annotated[
        float,
        typer.Option(
            help="Learning-rate multiple of the interaction layer's id tables, on top of"
            " --shared-lr (README Model quality, sections 7 and 8)."
        ),
    ] = 2.0,
    select_by: Annotated[
        str,
        typer.Option(
            help="What early stopping keeps the epoch by: 'auc' (the loss-weighted mean of"
            " click AUC, watch XAUC and like AUC) or 'loss' (the validation loss; README Model"
            " quality, section 8).",
        ),
    ] = "auc",
    select_each: Annotated[
        bool,
        typer.Option(
            help="With --arch single_task: stop each task's network on its own validation"
            " value and keep its own best epoch, as separately trained models would.",
        ),
    ] = False,
    entire_space: Annotated[
        bool | None,
        typer.Option(
            "--entire-space/--independent-heads",
            help="Watch and like heads chained with the click (ESMM), or independent"
            " (default: independent; README Model quality, section 3).",
        ),
    ] = None,
    ple_levels: Annotated[
        int,
        typer.Option(help="PLE's extraction levels: 1 (CGC) or 2 (with --arch ple)."),
    ] = 1,
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
    stream: Annotated[
        str,
        typer.Option(
            help="Stream --data logs from disk in bounded memory: on, off, or auto (Parquet"
            " logs of 2M impressions or more)."
        ),
    ] = "auto",
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
    """Train a ranking model (``--arch``, MMoE by default), export it to ONNX, publish the bundle.

    Under torchrun (``torchrun --nproc_per_node N -m model.cli train ...``) every process is one
    DDP rank.
    """
    from model.training.config import (
        TrainConfig,
        TrainJob,
        parse_interactions,
        parse_loss_weights,
    )
    from model.training.train import run_train

    try:  # every option is parsed and checked here, once: a bad one fails before any data is read
        config = TrainConfig(
            arch=arch,
            small=small,
            interactions=parse_interactions(interactions),
            interaction_dim=interaction_dim,
            epochs=epochs,
            seed=seed,
            batch_size=batch_size,
            lr=lr,
            loss_weights=parse_loss_weights(loss_weights),
            loss_balance=loss_balance,
            gate_temperature=gate_temperature,
            gate_dropout=gate_dropout,
            experts=experts,
            shared_lr=shared_lr,
            interaction_lr=interaction_lr,
            select_by=select_by,
            select_each=select_each,
            entire_space=entire_space,
            ple_levels=ple_levels,
            sparse=sparse,
            precision=precision,
            compile=compile_,
            id_l2=id_l2,
        )
        job = TrainJob(
            registry=registry,
            data=data,
            simulate=simulate,
            preset=preset,
            train=config,
            version=version,
            activate=activate,
            if_empty=if_empty,
            nproc=nproc,
            quantize=quantize,
            stream=stream,
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
    from model.training.analysis.fusion_search import Floor
    from model.training.analysis.report import REPORT_FILE, write_report
    from model.training.analysis.tune import TuneJob, run_tune_fusion

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
def report(
    version: str,
    registry: RegistryOpt = Path("registry"),
    curve: Annotated[
        Path | None,
        typer.Option(help="A `vidrank curve` output directory to attach to VERSION's report."),
    ] = None,
) -> None:
    """Write VERSION's Markdown report with PNG plots to <registry>/reports/VERSION/."""
    from model.training.analysis.report import REPORT_FILE, attach_curve, write_report

    _check_version(registry, version)
    if curve is not None:
        try:
            attach_curve(_registry(registry), version, curve)
        except ValueError as e:
            _fail(str(e))
    typer.echo(str(write_report(_registry(registry), version) / REPORT_FILE))


def _check_version(registry: Path, version: str) -> None:
    """Fail with a one-line error unless VERSION is a readable bundle of the registry."""
    _registry(registry).bundle(version)


def _names(text: str) -> tuple[str, ...]:
    return tuple(filter(None, (part.strip() for part in text.split(","))))


def _seeds(text: str, flag: str = "--seeds") -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in _names(text))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected integers such as 0,1,2") from None


@app.command()
def experiment(
    out: Annotated[Path, typer.Option(help="Output directory (a rerun resumes it).")] = Path(
        "experiment"
    ),
    presets: Annotated[
        str, typer.Option(help="Simulator presets, comma-separated, by increasing relatedness.")
    ] = "conflicting,unrelated,related,identical",
    archs: Annotated[
        str | None,
        typer.Option(
            help="Architectures, comma-separated (default: every --arch); ARCH:OPTION trains"
            " ARCH with a --loss-balance (stem:fixed), es/indep heads (stem:indep), wide"
            " interaction tables, ple:levels2, sharp/soft gates or mmoe:paper (Ma et al.'s MMoE)."
        ),
    ] = None,
    seeds: Annotated[str, typer.Option(help="Seeds, comma-separated (world and training).")] = (
        "0,1,2"
    ),
    impressions: Annotated[int, typer.Option(help="Simulated impressions per world.")] = 60_000,
    epochs: Annotated[int, typer.Option(help="Maximum epochs per run.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 1024,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-2,
    users: Annotated[int, typer.Option(help="Users per world.")] = 600,
    videos: Annotated[int, typer.Option(help="Videos per world (authors, music scale).")] = 1_500,
    small: Annotated[
        bool,
        typer.Option(
            "--small/--full",
            help="The small network (default: fits the time on 2 cores) or the trainer's default.",
        ),
    ] = True,
) -> None:
    """Sweep simulator presets x architectures x seeds; write runs, a Markdown table and a plot."""
    from model.training.analysis.experiment import Sweep, check_resumable, run_sweep
    from model.training.config import ARCHS

    try:
        sweep = Sweep(
            presets=_names(presets),
            archs=_names(archs) if archs else ARCHS,
            seeds=_seeds(seeds),
            impressions=impressions,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            n_users=users,
            n_videos=videos,
            small=small,
        )
        check_resumable(out, sweep)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    run_sweep(sweep, out)
    typer.echo(f"wrote {out / 'summary.md'} and {out / 'relatedness.png'}")


@app.command()
def curve(
    out: Annotated[Path, typer.Option(help="Output directory (a rerun resumes it).")] = Path(
        "curve"
    ),
    preset: Annotated[str, typer.Option(help="The simulated world (see `simulate`).")] = "default",
    seed: Annotated[int, typer.Option(help="World and training seed.")] = 0,
    sizes: Annotated[
        str, typer.Option(help="Impressions per point, comma-separated.")
    ] = "100000,300000,1000000,3000000",
    archs: Annotated[
        str,
        typer.Option(help="Architectures (ARCH or ARCH:OPTION, see experiment), comma-separated."),
    ] = "mmoe,shared_bottom,single_task",
    small: Annotated[bool, typer.Option("--small", help="A tiny network (tests).")] = False,
) -> None:
    """Learning curve: held-out quality vs impressions for each architecture, truth beside it."""
    from model.training.analysis.curve import CURVE_FILE, Curve, run_curve

    try:
        spec = Curve(
            preset=preset,
            seed=seed,
            sizes=_seeds(sizes, "--sizes"),
            archs=_names(archs),
            small=small,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    try:
        run_curve(spec, out)
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"wrote {out / CURVE_FILE}")


@app.command()
def serve(
    registry: RegistryOpt = Path("registry"),
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (one per core).")] = None,
) -> None:
    """Serve POST /rank (and health, models, admin, metrics) with uvicorn."""
    from service.http.server import run_server
    from service.settings import Settings

    overrides: dict[str, object] = {"registry": registry}
    for key, value in (("host", host), ("port", port), ("workers", workers)):
        if value is not None:
            overrides[key] = value
    run_server(Settings(**overrides))  # type: ignore[arg-type]


def _registry(path: Path):  # type: ignore[no-untyped-def]
    from model.core.registry import Registry

    return Registry(path)


@models_app.command("list")
def models_list(registry: RegistryOpt = Path("registry")) -> None:
    """List published versions with their aliases and headline metrics."""
    reg = _registry(registry)
    aliases = reg.read_aliases()
    roles = (
        ("production", aliases.production),
        ("canary", aliases.canary.version if aliases.canary else None),
        ("shadow", aliases.shadow.version if aliases.shadow else None),
    )
    for v in reg.versions():
        tags = [t for t, name in roles if name == v]
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
    typer.echo(json.dumps(_registry(registry).bundle(version).manifest, indent=2))


def _print_aliases(aliases) -> None:  # type: ignore[no-untyped-def]
    typer.echo(json.dumps(aliases.to_dict(), indent=2))


@models_app.command("activate")
def models_activate(
    version: str, registry: RegistryOpt = Path("registry"), reason: ReasonOpt = None
) -> None:
    """Make VERSION production (verifies the bundle first); every replica converges on it."""
    reg = _registry(registry)
    reg.bundle(version)  # verify checksum and schema before any replica tries it
    _print_aliases(reg.activate(version, actor=ACTOR, reason=reason))
    _warn_snapshot_lacks(registry)


@models_app.command("rollback")
def models_rollback(registry: RegistryOpt = Path("registry"), reason: ReasonOpt = None) -> None:
    """Return production to the previously active version (verifies its bundle first)."""
    from model.core.bundle import BundleError

    reg = _registry(registry)
    previous = reg.read_aliases().previous
    target = previous[-1] if previous else None
    if target is not None:
        try:  # checksum and schema, as activate does: replicas would refuse it
            reg.bundle(target)
        except BundleError as e:
            _fail(f"cannot roll back to {target}: {e}")
    _print_aliases(reg.rollback(expected=target, actor=ACTOR, reason=reason))


@models_app.command("deactivate")
def models_deactivate(
    registry: RegistryOpt = Path("registry"),
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm: every replica stops serving.")
    ] = False,
    reason: ReasonOpt = None,
) -> None:
    """Take the production model away from every replica (they answer 503); rollback undoes it.

    The only way to leave replicas without a model: a missing or broken aliases file never does.
    """
    if not yes:
        _fail("every replica will stop serving /rank; pass --yes to confirm")
    _print_aliases(_registry(registry).deactivate(actor=ACTOR, reason=reason))


@models_app.command("canary")
def models_canary(
    version: Annotated[
        str | None, typer.Argument(help="Canary version; omit with --clear.")
    ] = None,
    percent: Annotated[float, typer.Option(help="Percent of users (0 < p <= 100).")] = 10.0,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the canary.")] = False,
    max_error_ratio: Annotated[
        float | None, typer.Option(help="Policy: server errors / canary requests.")
    ] = None,
    max_p99_ratio: Annotated[
        float | None, typer.Option(help="Policy: canary p99 / production p99.")
    ] = None,
    max_psi: Annotated[
        float | None, typer.Option(help="Policy: PSI of any task vs the training data.")
    ] = None,
    min_requests: Annotated[
        int | None, typer.Option(help="Policy: canary requests before judging.")
    ] = None,
    window_s: Annotated[float | None, typer.Option(help="Policy: window in seconds.")] = None,
    registry: RegistryOpt = Path("registry"),
    reason: ReasonOpt = None,
) -> None:
    """Send PERCENT of users (stable by user_id) to VERSION, or clear the canary.

    The --max-*/--min-requests/--window-s options set this canary's policy for automatic
    rollback (the service's settings fill in the rest).
    """
    from model.core.policy import CanaryPolicy

    reg = _registry(registry)
    if clear:
        _print_aliases(reg.clear_canary(actor=ACTOR, reason=reason))
    elif version is None:
        _fail("give a VERSION or --clear")
    else:
        bounds = CanaryPolicy(max_error_ratio, max_p99_ratio, max_psi, min_requests, window_s)
        policy = bounds if bounds.to_dict() else None
        reg.bundle(version)
        _print_aliases(reg.set_canary(version, percent, policy, actor=ACTOR, reason=reason))


@models_app.command("shadow")
def models_shadow(
    version: Annotated[
        str | None, typer.Argument(help="Shadow version; omit with --clear.")
    ] = None,
    percent: Annotated[
        float, typer.Option(help="Percent of requests also scored by VERSION (0 < p <= 100).")
    ] = 10.0,
    clear: Annotated[bool, typer.Option("--clear", help="Stop shadow scoring.")] = False,
    registry: RegistryOpt = Path("registry"),
    reason: ReasonOpt = None,
) -> None:
    """Have VERSION also score PERCENT of requests, off the response path, for comparison."""
    reg = _registry(registry)
    if clear:
        _print_aliases(reg.clear_shadow(actor=ACTOR, reason=reason))
    elif version is None:
        _fail("give a VERSION or --clear")
    else:
        reg.bundle(version)
        _print_aliases(reg.set_shadow(version, percent, actor=ACTOR, reason=reason))


@models_app.command("history")
def models_history(
    registry: RegistryOpt = Path("registry"),
    limit: Annotated[int, typer.Option(help="Show the last N changes (0: all).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Every change of the aliases (activate, rollback, canary, shadow, automatic rollback)."""
    history = _registry(registry).history
    lines = history.tail(limit) if limit > 0 else history.read()
    for line in lines:
        if as_json:
            typer.echo(json.dumps(line))
            continue
        change = f"{line.get('from') or '-'} -> {line.get('to') or '-'}"
        if line.get("percent") is not None:
            change += f" ({line['percent']:g}%)"
        reason = f"  {line['reason']}" if line.get("reason") else ""
        typer.echo(
            f"{line.get('time', '?'):27s} {line.get('action', '?'):13s} "
            f"{line.get('actor', '?'):13s} {change}{reason}"
        )


# -- feature snapshots ----------------------------------------------------------------------------


def _feature_store(registry: Path, redis_url: str | None):  # type: ignore[no-untyped-def]
    """The snapshot store the options name: Redis when --redis is given, else the registry's."""
    if redis_url:
        from model.core.store.redis_store import RedisSnapshots, connect

        return RedisSnapshots(connect(redis_url, timeout_s=30.0))
    from model.core.store.embedded import SnapshotStore

    return SnapshotStore(registry)


def _active_snapshot(store) -> str | None:  # type: ignore[no-untyped-def]
    return store.active()


def _warn_lacks(registry: Path, columns: dict[str, list[str]]) -> None:
    """Name the features the registry's served versions read that the snapshot lacks."""
    from model.core.store.encoded import lacks

    reg = _registry(registry)
    try:
        aliases = reg.read_aliases()
    except Exception:  # no registry here (e.g. a Redis-only publisher): nothing to compare with
        return
    for version in {aliases.production, aliases.canary.version if aliases.canary else None}:
        if version is None or not reg.has(version):
            continue
        missing = lacks(reg.bundle(version, verify=False).schema, columns)
        if missing:
            typer.echo(f"warning: {version} reads features the snapshot lacks: {list(missing)}")


def _warn_snapshot_lacks(registry: Path) -> None:
    """After a model activation: what the registry's active feature snapshot lacks, if any."""
    from model.core.store.embedded import SnapshotStore
    from model.core.store.snapshot import SnapshotError

    store = SnapshotStore(registry)
    try:
        active = store.active()
        if active is None:
            return
        entities = store.manifest(active)["entities"]
    except (SnapshotError, KeyError):
        return
    _warn_lacks(registry, {e: list(spec["columns"]) for e, spec in entities.items()})


@features_app.command("publish")
def features_publish(
    data: Annotated[
        Path, typer.Option(help="Directory with user_features* and video_features_basic*.")
    ],
    registry: RegistryOpt = Path("registry"),
    redis_url: RedisOpt = None,
    snapshot: Annotated[
        str | None, typer.Option(help="Snapshot name (default: s + the UTC time).")
    ] = None,
    as_of: Annotated[
        str | None,
        typer.Option(help="Day upload_age_days is computed for (default: last log day, today)."),
    ] = None,
    activate: Annotated[
        bool, typer.Option("--activate/--no-activate", help="Make the snapshot active.")
    ] = True,
    if_empty: Annotated[
        bool, typer.Option("--if-empty", help="Do nothing when a snapshot is already active.")
    ] = False,
) -> None:
    """Publish the user and video tables of DATA (KuaiRand schema, CSV or Parquet) as a
    snapshot; every replica converges on it once it is active."""
    from model.training.feature_tables import default_snapshot_name, publish_features

    store = _feature_store(registry, redis_url)
    if if_empty and _active_snapshot(store) is not None:
        typer.echo(f"snapshot {_active_snapshot(store)} is active; nothing to do (--if-empty)")
        return
    name = snapshot or default_snapshot_name()
    try:
        summary = publish_features(data, store, name, as_of)
        if activate:
            store.activate(name)
    except ValueError as e:  # the tables themselves (a column, a value): not a domain error
        _fail(str(e))
    _warn_lacks(registry, summary["columns"])
    typer.echo(json.dumps({**summary, "active": activate}, indent=2))


@features_app.command("list")
def features_list(registry: RegistryOpt = Path("registry"), redis_url: RedisOpt = None) -> None:
    """List snapshots (oldest first) with their row counts; the active one is marked."""
    store = _feature_store(registry, redis_url)
    active = _active_snapshot(store)
    for name in store.snapshots():
        try:
            m = store.manifest(name)
            rows = " ".join(f"{e}={s['rows']}" for e, s in m["entities"].items())
            summary = f"{m.get('created_at', '')}  {rows}"
        except Exception as e:  # a broken snapshot is listed, not fatal
            summary = f"INVALID: {e}"
        typer.echo(f"{name:24s} {'active' if name == active else '':8s} {summary}")


@features_app.command("show")
def features_show(
    snapshot: str, registry: RegistryOpt = Path("registry"), redis_url: RedisOpt = None
) -> None:
    """Print a snapshot's manifest (columns, row counts, checksums, source)."""
    typer.echo(json.dumps(_feature_store(registry, redis_url).manifest(snapshot), indent=2))


@features_app.command("activate")
def features_activate(
    snapshot: str, registry: RegistryOpt = Path("registry"), redis_url: RedisOpt = None
) -> None:
    """Make SNAPSHOT active (verified first); every replica converges on it."""
    store = _feature_store(registry, redis_url)
    previous = _active_snapshot(store)
    # The embedded store checks every checksum before any replica tries the snapshot.
    manifest = store.manifest(snapshot) if redis_url else store.load(snapshot).manifest
    store.activate(snapshot)
    _warn_lacks(registry, {e: list(s["columns"]) for e, s in manifest["entities"].items()})
    typer.echo(json.dumps({"active": snapshot, "previous": previous}, indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
